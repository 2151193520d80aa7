fn main() {
    eprintln!("dbproxy: not implemented yet (issue 3)");
    std::process::exit(2);
}
