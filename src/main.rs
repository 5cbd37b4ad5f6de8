//! The `dmsnap` command line.
fn main() {
    eprintln!("dmsnap: under construction");
    std::process::exit(2);
}
