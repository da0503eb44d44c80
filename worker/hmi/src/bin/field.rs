//! The `field` layer's worker: everything is in [`airlock_hmi::field`].

fn main() -> std::process::ExitCode {
    airlock_hmi::field::main()
}
