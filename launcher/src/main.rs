//! `launcher`: plan, start and supervise Tandem's processes. Thin: parse
//! flags, call the library.

use clap::Parser;
use launcher::cli::{self, Args};

fn main() {
    let args = Args::parse();
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("launcher: error: {e:#}");
            std::process::exit(2);
        }
    }
}
