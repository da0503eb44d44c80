//! `airlock-mangen DIR`: writes the man pages of `airlockd` and `airlock` (section 8) into
//! DIR, from the same command-line definitions the binaries parse. Used to build packages.

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: airlock-mangen DIR");
        return std::process::ExitCode::from(2);
    };
    let dir = std::path::PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("airlock-mangen: creating {}: {e}", dir.display());
        return std::process::ExitCode::FAILURE;
    }
    match airlock_supervisor::cli::write_man_pages(&dir) {
        Ok(pages) => {
            for p in pages {
                println!("{}", p.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("airlock-mangen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
