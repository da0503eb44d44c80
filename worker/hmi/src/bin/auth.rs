//! The `auth` layer's worker: everything is in [`airlock_hmi::auth`].

fn main() -> std::process::ExitCode {
    airlock_hmi::auth::main()
}
