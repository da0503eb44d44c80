//! The `plcsim` layer's worker: everything is in [`airlock_hmi::plcsim`].

fn main() -> std::process::ExitCode {
    airlock_hmi::plcsim::main()
}
