//! The `bridge` layer's worker: everything is in [`airlock_hmi::bridge`].

fn main() -> std::process::ExitCode {
    airlock_hmi::bridge::main()
}
