//! `airlock-hmi`: the default job, an HMI for a simulated heated tank, as six confined layers
//! (`docs/hmi.md`). Each layer's logic is library code here, so it can be tested, fuzzed and
//! benchmarked in one process; each worker binary is one line that calls its layer's `main`.
//!
//! - [`plcsim`]: the simulated Modbus TCP device.
//! - [`field`]: device I/O on a connection the supervisor opened; validates Modbus answers.
//! - [`logic`]: tag table, alarms with hysteresis, setpoint validation and interlocks.
//! - [`historian`]: the SQLite history, trends and CSV export.
//! - [`auth`]: operator logins against the [`credentials`] file, sessions.
//! - [`ui`]: HTTP/1.1 for operators' browsers on a socket the supervisor opened.
//! - [`bridge`]: the site's Sparkplug B edge node over MQTT, with store and forward.
//! - [`types`]: the bodies the layers exchange; [`operators`]: the `airlock-hmi user` tool.
//! - [`single`]: the same layers composed in one process, the baseline of the HMI benchmark.
//!
//! Nothing here is linked by the supervisor: its dependency graph holds none of this crate's
//! dependencies (SQLite, Argon2, Modbus, HTTP parsing).
#![deny(unsafe_code)]

pub mod auth;
pub mod bridge;
pub mod credentials;
pub mod field;
#[cfg(feature = "history")]
pub mod historian;
pub mod logic;
pub mod operators;
pub mod plcsim;
pub mod samples;
#[cfg(feature = "history")]
pub mod single;
pub mod types;
pub mod ui;
