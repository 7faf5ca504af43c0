//! `launcher`: plan, start and supervise Tandem's processes. Thin: parse
//! flags, call the library.

use clap::Parser;
use launcher::cli::{self, Args, ReportArgs};

fn main() {
    // `launcher report RUN_DIR`; anything else is a run (`--config ...`).
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = if argv.get(1).is_some_and(|a| a == "report") {
        argv.remove(1);
        cli::run_report(ReportArgs::parse_from(argv))
    } else {
        cli::run(Args::parse_from(argv))
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("launcher: error: {e:#}");
            std::process::exit(2);
        }
    }
}
