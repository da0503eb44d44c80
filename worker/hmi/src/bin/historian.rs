//! The `historian` layer's worker: everything is in [`airlock_hmi::historian`].

fn main() -> std::process::ExitCode {
    airlock_hmi::historian::main()
}
