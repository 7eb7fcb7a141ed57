//! The `slipstream` command line (DESIGN.md section 9).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use slipstream::apply::Fold;
use slipstream::config::{self, Config};
use slipstream::generate::{generate, GenerateOptions};
use slipstream::ingest;
use slipstream::pipeline::Pipeline;
use slipstream::publish::{local::LocalSink, Sink};
use slipstream::state::Store;

/// The fold and materialization allocate many small, short-lived records; mimalloc's
/// thread-local free lists handle that pattern much better than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "slipstream",
    version,
    about = "Streaming, incremental experiment analysis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Output {
    /// Write tables as NDJSON files into this directory (the local sink).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file or directory and print every problem.
    CheckConfig {
        /// A TOML file or a directory of them.
        config: PathBuf,
    },
    /// Write synthetic enrollment and telemetry events (NDJSON) for a config.
    Generate {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 1000)]
        clients: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// True relative effect on active_hours and uri_count in non-reference branches.
        #[arg(long, default_value_t = 0.1)]
        effect: f64,
        /// Fraction of events that arrive 1-3 days late.
        #[arg(long, default_value_t = 0.01)]
        late_fraction: f64,
        /// Fraction of malformed lines.
        #[arg(long, default_value_t = 0.001)]
        malformed_fraction: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Fold an NDJSON event file into state and publish windows as they complete.
    Replay {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "state")]
        data_dir: PathBuf,
        #[command(flatten)]
        output: Output,
    },
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn sink(output: &Output) -> anyhow::Result<Box<dyn Sink>> {
    match &output.out {
        Some(dir) => Ok(Box::new(LocalSink::new(dir).with_context(|| {
            format!("cannot create output directory {}", dir.display())
        })?)),
        None => anyhow::bail!("no output given: pass --out DIR for the local sink"),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLIPSTREAM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(cfg) => {
                println!("ok: {} experiment(s)", cfg.experiments.len());
                for e in &cfg.experiments {
                    let windows = slipstream::window::windows(e);
                    println!(
                        "  {}: branches {:?}, enrollment {} + {} days, end {}, {} metrics, {} segments, {} windows",
                        e.slug,
                        e.branches.iter().map(|b| &b.name).collect::<Vec<_>>(),
                        e.enrollment_start,
                        e.enrollment_period,
                        e.end_date,
                        e.metrics.len(),
                        e.segments.len(),
                        windows.len()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Generate {
            config,
            clients,
            seed,
            effect,
            late_fraction,
            malformed_fraction,
            out,
        } => {
            let cfg = load_config(&config)?;
            let opts = GenerateOptions {
                clients,
                seed,
                effect,
                late_fraction,
                malformed_fraction,
                ..Default::default()
            };
            let file = std::fs::File::create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            let s = generate(&cfg, &opts, &mut w)?;
            w.flush()?;
            println!(
                "wrote {} lines to {} ({} enrollment, {} telemetry; {} late, {} malformed)",
                s.lines,
                out.display(),
                s.enrollments,
                s.telemetry,
                s.late,
                s.malformed
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            input,
            data_dir,
            output,
        } => {
            let cfg = load_config(&config)?;
            let sink = sink(&output)?;
            let store = Store::open(&data_dir, &cfg)?;
            let source = ingest::file::source_name(&input);
            let fold = Fold::new(cfg, store, &[&source])?;
            let mut pipeline = Pipeline::new(fold, sink);
            let started = std::time::Instant::now();
            let s = ingest::file::replay(&mut pipeline, &input)?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "replayed {} lines from {} (resumed at byte {}) in {:.2}s: {} folded ({:.0} events/s), {} rejected; published {} tables ({} rows) to {}",
                s.lines,
                input.display(),
                s.resumed_at,
                secs,
                s.folded,
                s.lines as f64 / secs.max(1e-9),
                s.rejected,
                s.published.tables,
                s.published.rows,
                pipeline.sink_description()
            );
            let t = pipeline.times;
            println!("time: {:.2}s writing state batches, {:.2}s materializing tables, {:.2}s in the sink, the rest reading and folding", t.flush.as_secs_f64(), t.materialize.as_secs_f64(), t.sink.as_secs_f64());
            let rejects = pipeline.fold.reject_totals();
            if !rejects.is_empty() {
                println!("rejected events by reason (all runs on this data dir):");
                for (r, n) in rejects {
                    println!("  {:<20} {n}", r.as_str());
                }
            }
            if !s.published.failures.is_empty() {
                for f in &s.published.failures {
                    eprintln!("publication failed: {f}");
                }
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
