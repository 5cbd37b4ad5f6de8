//! The `dmsnap` command line: parse, dispatch, map errors to exit codes.
//! Everything else lives in the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
