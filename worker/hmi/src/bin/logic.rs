//! The `logic` layer's worker: everything is in [`airlock_hmi::logic`].

fn main() -> std::process::ExitCode {
    airlock_hmi::logic::main()
}
