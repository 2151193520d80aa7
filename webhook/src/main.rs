fn main() {
    eprintln!("dbwebhook: not implemented yet (issue 7)");
    std::process::exit(2);
}
