//! The `mirrorpoint-bench` binary: parses the command line, runs, prints.
//!
//! Everything of substance is in the library so tests can call it; this
//! file only maps errors to one line on stderr and an exit status (2 for
//! bad arguments, as clap uses, 1 for runs that failed).

use clap::Parser;
use mirrorpoint_bench::{output, run_local, run_nvmf, BenchError, Cli, Command};

fn run(cli: Cli) -> Result<(), BenchError> {
    match cli.command {
        Command::Local(args) => {
            let config = args.validate()?;
            let report = run_local(&config)?;
            output::write_plot(&report, config.timeline.as_ref())?;
            if args.json {
                println!("{}", output::json(&report));
            } else {
                print!("{}", output::table(&report));
            }
            Ok(())
        }
        Command::Tcp(args) => {
            let r = mirrorpoint_bench::tcp::run_tcp(&args)?;
            if args.json {
                println!("{}", output::json_value(&r));
            } else {
                println!(
                    "tcp: {} stream(s) to {}, {} B sends: {:.0} MiB/s over {:.2} s",
                    r.streams, r.to, r.bs, r.mib_s, r.time_s
                );
            }
            Ok(())
        }
        Command::Nvmf(args) => {
            let config = args.validate()?;
            let report = run_nvmf(&config)?;
            output::write_plot(&report, config.load.timeline.as_ref())?;
            if args.json {
                println!("{}", output::json(&report));
            } else {
                print!("{}", output::table(&report));
            }
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("mirrorpoint-bench: {e}");
        std::process::exit(e.exit_code());
    }
}
