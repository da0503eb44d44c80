//! The `ui` layer's worker: everything is in [`airlock_hmi::ui`].

fn main() -> std::process::ExitCode {
    airlock_hmi::ui::main()
}
