fn main() {
    eprintln!("dsnexec: not implemented yet (issue 8)");
    std::process::exit(2);
}
