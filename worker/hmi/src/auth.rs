//! `auth`: the HMI's authentication layer. The only layer that can read the operator
//! credential file (its state directory is the only path its Landlock rules open). Checks
//! logins against Argon2id hashes, and issues and validates session tokens with expiry.
//!
//! Services: `auth.login` ([`hmi::Login`] → [`hmi::SessionInfo`]), `auth.validate` and
//! `auth.logout` ([`hmi::Token`]). On first start with no credential file it creates one
//! operator, `operator`, with a random password printed once to the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::credentials::{self, Operator};
use crate::types::{self as hmi, Login, SessionInfo, Token};
use airlock_worker::{Response, Worker};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AuthSettings {
    #[serde(default = "d_ttl")]
    session_ttl_s: u64,
    #[serde(default = "d_max")]
    max_sessions: usize,
    /// Failed logins for one name before it is locked for `lockout-s`.
    #[serde(default = "d_failures")]
    max_failures: u32,
    #[serde(default = "d_lockout")]
    lockout_s: u64,
}
fn d_ttl() -> u64 {
    3600
}
fn d_max() -> usize {
    256
}
fn d_failures() -> u32 {
    5
}
fn d_lockout() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
pub(crate) struct Settings {
    #[serde(default)]
    auth: Option<AuthSettings>,
}

#[derive(Debug)]
struct Session {
    user: String,
    expires: Instant,
    expires_ms: i64,
}

#[derive(Debug)]
pub(crate) struct Auth {
    file: PathBuf,
    settings: AuthSettings,
    sessions: HashMap<String, Session>,
    failures: HashMap<String, (u32, Instant)>,
    /// This second's start and the hashes computed in it.
    hash_window: (Instant, u32),
}

/// Login attempts hashed per second, at most (each costs an Argon2id hash, ~19 MiB).
const MAX_HASHES_PER_SECOND: u32 = 10;

/// The worker's entry point (its binary is one line that calls this).
pub fn main() -> ExitCode {
    airlock_worker::init_logging();
    let mut w = match Worker::start("auth", &["auth"]) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("airlock-worker-auth: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = match w.settings::<Settings>() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("bad [settings.auth]: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(dir) = w.state_directory().map(Path::to_path_buf) else {
        tracing::error!("auth needs its state directory (state-directory = true) for the credential file");
        return ExitCode::from(2);
    };
    let mut auth = match Auth::open(settings, &dir) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let served = w.serve(|_w, req, _bulk| Ok(Response::bytes(auth.handle(&req.method, &req.body)?)));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Creates the credential file with one operator if there is none, and says the password
/// once in the log. Never overwrites an existing file.
fn first_start(file: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if file.exists() {
        return Ok(());
    }
    let password = credentials::random_password()?;
    let mut ops = Vec::new();
    credentials::set(&mut ops, "operator", &password).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file)?;
    f.write_all(credentials::render(&ops).as_bytes())?;
    f.sync_all()?;
    // The one time this password is ever shown: it goes to the supervisor's log.
    tracing::warn!(
        "first start: created operator \"operator\" with password {password} -- log in with it, then set your own with `airlock-hmi user add operator`; it is not shown again"
    );
    Ok(())
}

impl Auth {
    /// Sessions and lockouts kept in memory, operators read from the credential file in
    /// `dir` (created with one operator on the first start).
    pub(crate) fn open(settings: Settings, dir: &Path) -> Result<Auth, String> {
        let settings = settings.auth.unwrap_or_else(|| AuthSettings {
            session_ttl_s: d_ttl(),
            max_sessions: d_max(),
            max_failures: d_failures(),
            lockout_s: d_lockout(),
        });
        let file = dir.join(credentials::FILE_NAME);
        first_start(&file).map_err(|e| format!("cannot create the credential file {}: {e}", file.display()))?;
        Ok(Auth {
            file,
            settings,
            sessions: HashMap::new(),
            failures: HashMap::new(),
            hash_window: (Instant::now(), 0),
        })
    }

    /// Answers a request for one of auth's methods.
    pub(crate) fn handle(&mut self, method: &str, body: &[u8]) -> Result<Vec<u8>, String> {
        Ok(match method {
            "login" => hmi::encode(&self.login(hmi::decode(body)?)?),
            "validate" => hmi::encode(&self.validate(&hmi::decode::<Token>(body)?)?),
            "logout" => {
                let t: Token = hmi::decode(body)?;
                if let Some(s) = self.sessions.remove(&t.0) {
                    tracing::info!(user = %s.user, "logout");
                }
                hmi::encode(&())
            }
            other => return Err(format!("auth has no method {other:?}")),
        })
    }

    /// Reads the file on every login, so `airlock-hmi user add` takes effect without a restart.
    fn operators(&self) -> Result<Vec<Operator>, String> {
        let text = std::fs::read_to_string(&self.file).map_err(|e| {
            tracing::error!(file = %self.file.display(), "cannot read the credential file: {e}");
            "credential store unavailable".to_string()
        })?;
        credentials::parse(&text).map_err(|e| {
            tracing::error!(file = %self.file.display(), "credential file: {e}");
            "credential store unavailable".to_string()
        })
    }

    fn login(&mut self, l: Login) -> Result<SessionInfo, String> {
        const REFUSED: &str = "wrong user name or password";
        let now = Instant::now();
        if !credentials::valid_name(&l.user) || l.password.len() > 256 {
            // Never a hash, nor a log line, for what no operator can be called.
            return Err(REFUSED.into());
        }
        if let Some((n, since)) = self.failures.get(&l.user) {
            if *n >= self.settings.max_failures && now < *since + Duration::from_secs(self.settings.lockout_s) {
                tracing::warn!(target: "airlock::security", user = %l.user, "login refused: locked after repeated failures");
                return Err(format!("too many failed logins: try again in {} s", self.settings.lockout_s));
            }
        }
        // Each attempt costs an Argon2 hash: a bounded number per second, whoever asks, so a
        // flood of logins cannot keep auth from validating the sessions that exist.
        if now >= self.hash_window.0 + Duration::from_secs(1) {
            self.hash_window = (now, 0);
        }
        if self.hash_window.1 >= MAX_HASHES_PER_SECOND {
            tracing::warn!(target: "airlock::security", "login refused: more than {MAX_HASHES_PER_SECOND} attempts in a second");
            return Err("too many login attempts: try again in a second".into());
        }
        self.hash_window.1 += 1;
        let ops = self.operators()?;
        // An unknown name costs a hash too, so timing does not tell which names exist.
        let dummy = Operator { name: String::new(), hash: DUMMY.get_or_init(dummy_hash).clone() };
        let (op, known) = match ops.iter().find(|o| o.name == l.user) {
            Some(o) => (o, true),
            None => (&dummy, false),
        };
        if !(credentials::verify(op, &l.password) && known) {
            let e = self.failures.entry(l.user.clone()).or_insert((0, now));
            if now >= e.1 + Duration::from_secs(self.settings.lockout_s) {
                *e = (0, now);
            }
            e.0 += 1;
            e.1 = now;
            if self.failures.len() > 4096 {
                // Forget what has served its lockout first; then the oldest.
                let lockout = Duration::from_secs(self.settings.lockout_s);
                self.failures.retain(|_, (_, since)| now < *since + lockout);
                while self.failures.len() > 4096 {
                    let Some(k) = self.failures.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) else {
                        break;
                    };
                    self.failures.remove(&k);
                }
            }
            tracing::warn!(target: "airlock::security", user_known = known, "login failed");
            return Err(REFUSED.into());
        }
        self.failures.remove(&l.user);
        self.expire(now);
        if self.sessions.len() >= self.settings.max_sessions {
            // The session closest to expiry makes room.
            if let Some(k) = self.sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                self.sessions.remove(&k);
            }
        }
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let ttl = Duration::from_secs(self.settings.session_ttl_s);
        let expires_ms = hmi::now_ms() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.sessions.insert(token.clone(), Session { user: l.user.clone(), expires: now + ttl, expires_ms });
        tracing::info!(user = %l.user, "login");
        Ok(SessionInfo { user: l.user, token, expires_ms })
    }

    fn validate(&mut self, t: &Token) -> Result<SessionInfo, String> {
        self.expire(Instant::now());
        match self.sessions.get(&t.0) {
            Some(s) => Ok(SessionInfo { user: s.user.clone(), token: t.0.clone(), expires_ms: s.expires_ms }),
            None => Err("no valid session: log in".into()),
        }
    }

    fn expire(&mut self, now: Instant) {
        self.sessions.retain(|_, s| s.expires > now);
    }
}

static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn dummy_hash() -> String {
    credentials::hash("not a password anyone has").unwrap_or_default()
}
