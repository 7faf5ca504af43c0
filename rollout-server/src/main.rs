fn main() {
    eprintln!("rollout-server: not built yet (issue 4)");
    std::process::exit(2);
}
