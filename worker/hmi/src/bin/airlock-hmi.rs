//! `airlock-hmi`: tools for the HMI's own data (today: its operators).

fn main() -> std::process::ExitCode {
    airlock_hmi::operators::main()
}
