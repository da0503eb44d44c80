//! `sd_notify`: READY, STOPPING, WATCHDOG and STATUS to systemd when `NOTIFY_SOCKET` is set.
//! Silent (and free) when it is not.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager's notification socket, if any.
#[derive(Debug)]
pub struct Notifier {
    sock: Option<(UnixDatagram, String)>,
    /// Half the watchdog interval, when systemd asked for pings.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let path = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty());
        let sock = path.and_then(|p| UnixDatagram::unbound().ok().map(|s| (s, p)));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|p| p == std::process::id())
            })
            .map(|us| Duration::from_micros(us / 2));
        Notifier { sock, watchdog }
    }

    pub fn send(&self, state: &str) {
        let Some((s, path)) = &self.sock else { return };
        let r = if let Some(abs) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
                .and_then(|a| s.send_to_addr(state.as_bytes(), &a))
        } else {
            s.send_to(state.as_bytes(), path)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}
