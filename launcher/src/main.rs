fn main() {
    eprintln!("launcher: not built yet (issue 6)");
    std::process::exit(2);
}
