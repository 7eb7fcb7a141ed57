//! The `slipstream` command line (DESIGN.md section 9).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use slipstream::apply::Fold;
use slipstream::config::{self, Config, Format};
use slipstream::event::{decode_json, encode_protobuf, Kind};
use slipstream::generate::{generate, GenerateOptions};
use slipstream::ingest;
use slipstream::pipeline::Pipeline;
use slipstream::publish::bigquery::{BigQueryConfig, BigQuerySink};
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
    #[arg(long, conflicts_with = "bigquery")]
    out: Option<PathBuf>,
    /// Publish to BigQuery: PROJECT.DATASET (overrides [pipeline.bigquery] target).
    #[arg(long)]
    bigquery: Option<String>,
    /// BigQuery REST endpoint, for an emulator (e.g. http://127.0.0.1:9050).
    #[arg(long)]
    bigquery_rest: Option<String>,
    /// BigQuery Storage gRPC endpoint, for an emulator (e.g. http://127.0.0.1:9060).
    #[arg(long)]
    bigquery_grpc: Option<String>,
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
    /// Load an NDJSON event file into the Kafka topics (enrollment events to the
    /// enrollments topic, everything else to the telemetry topic), keyed by client_id.
    Produce {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        input: PathBuf,
        /// Config whose [pipeline.kafka] names the topics (defaults: enrollments, telemetry).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Consume the Kafka topics, fold events into state and publish windows as they complete.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT...].
        #[arg(long, env = "SLIPSTREAM_BROKERS")]
        brokers: String,
        #[arg(long, default_value = "state")]
        data_dir: PathBuf,
        #[command(flatten)]
        output: Output,
        /// Stop (cleanly) after this many seconds without a message.
        #[arg(long)]
        idle_exit_secs: Option<u64>,
        /// Serve the HTTP API on this address while consuming (e.g. 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Nightly pass: publish what the calendar says is complete, re-publish dirty windows,
    /// retry failures; print one status per experiment. Exits 1 if any failed.
    Finalize {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "state")]
        data_dir: PathBuf,
        /// The last complete day (default: yesterday, UTC).
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        #[command(flatten)]
        output: Output,
    },
    /// Recompute from an event archive into a fresh data directory and re-publish (after a
    /// metric was added, changed or removed).
    Backfill {
        #[arg(long)]
        config: PathBuf,
        /// First day of events to fold.
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last day of events to fold; windows complete by its end are published.
        #[arg(long)]
        to: chrono::NaiveDate,
        /// An event archive (NDJSON) ...
        #[arg(long, required_unless_present = "brokers", conflicts_with = "brokers")]
        input: Option<PathBuf>,
        /// ... or the configured topics on these brokers, from the earliest retained
        /// offsets up to their ends when the backfill started (own consumer group, so the
        /// running service is not disturbed).
        #[arg(long, requires = "from_beginning")]
        brokers: Option<String>,
        /// Required with --brokers: says that the topics are read from the beginning.
        #[arg(long, requires = "brokers")]
        from_beginning: bool,
        /// A new (or empty) directory: backfill never mixes with existing state.
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        output: Output,
    },
    /// Serve the HTTP API over an existing data directory (no consuming).
    Serve {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "state")]
        data_dir: PathBuf,
        /// Address to bind; loopback by default.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Ask a running server whether it is ready (`GET /readyz`, with the bearer token from
    /// SLIPSTREAM_TOKEN or the config's [pipeline] token_file) or alive (`GET /healthz`);
    /// exits 0 on 200, 1 otherwise. For Kubernetes exec probes.
    #[command(group(clap::ArgGroup::new("probe").required(true).args(["ready", "live"])))]
    Probe {
        /// Probe readiness: `GET /readyz` (state open, partitions assigned).
        #[arg(long)]
        ready: bool,
        /// Probe liveness: `GET /healthz` (no token needed).
        #[arg(long)]
        live: bool,
        /// The server's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The server's config, for its [pipeline] token_file (SLIPSTREAM_TOKEN wins).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Give up after this long.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
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

/// The sink chosen by flags, else by `[pipeline.bigquery]` in config.
fn sink(output: &Output, cfg: &Config) -> anyhow::Result<Box<dyn Sink>> {
    if let Some(dir) = &output.out {
        return Ok(Box::new(LocalSink::new(dir).with_context(|| {
            format!("cannot create output directory {}", dir.display())
        })?));
    }
    let from_config = cfg.pipeline.bigquery.as_ref();
    let Some(target) = output.bigquery.as_ref().or(from_config.map(|b| &b.target)) else {
        anyhow::bail!("no output given: pass --out DIR (local files) or --bigquery PROJECT.DATASET, or set [pipeline.bigquery] target");
    };
    let mut bq = BigQueryConfig::from_target(target)
        .map_err(|e| anyhow::anyhow!("--bigquery {target}: {e}"))?;
    bq.rest_url = output
        .bigquery_rest
        .clone()
        .or_else(|| from_config.and_then(|b| b.rest_url.clone()));
    bq.grpc_url = output
        .bigquery_grpc
        .clone()
        .or_else(|| from_config.and_then(|b| b.grpc_url.clone()));
    if let Some(secs) = from_config.and_then(|b| b.timeout_secs) {
        bq.timeout = std::time::Duration::from_secs(secs);
    }
    Ok(Box::new(BigQuerySink::new(bq)?))
}

/// Prints one `DATE SLUG: status` line per experiment; failure if any failed.
fn print_statuses(statuses: &[slipstream::finalize::Status]) -> ExitCode {
    for s in statuses {
        println!("{} {}: {}", s.date, s.slug, s.status);
        if let Some((enrollments, days)) = s.dropped {
            println!(
                "{} {}: results final, per-client state dropped ({enrollments} enrollment and {days} daily records; sketches kept)",
                s.date, s.slug
            );
        }
    }
    if statuses.iter().any(|s| s.failed()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_rejects(pipeline: &Pipeline) {
    let rejects = pipeline.fold.reject_totals();
    if !rejects.is_empty() {
        println!("rejected events by reason (all runs on this data dir):");
        for (r, n) in rejects {
            println!("  {:<20} {n}", r.as_str());
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends), so `run` can flush and exit.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
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
        Command::Produce {
            brokers,
            input,
            config,
        } => {
            let kafka = match config {
                Some(c) => load_config(&c)?.pipeline.kafka,
                None => Default::default(),
            };
            let rt = tokio::runtime::Runtime::new()?;
            let started = std::time::Instant::now();
            let formats = (kafka.enrollments_format, kafka.telemetry_format);
            // Lines that do not decode are sent as they are: bad input for the stream to reject.
            let encode = |line: Vec<u8>, enrollment: bool| {
                let (format, kind) = if enrollment {
                    (formats.0, Kind::Enrollment)
                } else {
                    (formats.1, Kind::Telemetry)
                };
                match format {
                    Format::Json => line,
                    Format::Protobuf => match decode_json(&line, kind, usize::MAX) {
                        Ok(ev) => encode_protobuf(&ev),
                        Err(_) => line,
                    },
                }
            };
            let n = rt.block_on(ingest::kafka::produce_file_with(
                &brokers,
                &input,
                &kafka.enrollments_topic,
                &kafka.telemetry_topic,
                encode,
            ))?;
            println!(
                "produced {n} messages from {} to {brokers} in {:.2}s",
                input.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Finalize {
            config,
            data_dir,
            date,
            output,
        } => {
            let cfg = load_config(&config)?;
            let sink = sink(&output, &cfg)?;
            let store = Store::open(&data_dir, &cfg)?;
            let fold = Fold::new(cfg, store, &[])?;
            let mut pipeline = Pipeline::new(fold, sink);
            let date =
                date.unwrap_or_else(|| chrono::Utc::now().date_naive() - chrono::Days::new(1));
            let (statuses, report) = slipstream::finalize::finalize(&mut pipeline, date, None)?;
            let code = print_statuses(&statuses);
            println!(
                "published {} tables ({} rows) to {}",
                report.tables,
                report.rows,
                pipeline.sink_description()
            );
            Ok(code)
        }
        Command::Backfill {
            config,
            from,
            to,
            input,
            brokers,
            from_beginning: _,
            data_dir,
            output,
        } => {
            let mut cfg = load_config(&config)?;
            if to < from {
                anyhow::bail!("--to {to} is before --from {from}");
            }
            if std::fs::read_dir(&data_dir).is_ok_and(|mut d| d.next().is_some()) {
                anyhow::bail!("--data-dir {} is not empty: backfill recomputes into a fresh directory (publishing replaces the tables); pass a new one", data_dir.display());
            }
            if brokers.is_some() {
                // A group of its own: joining the service's would take partitions from it.
                let k = &mut cfg.pipeline.kafka;
                k.group_id = format!(
                    "{}-backfill-{}",
                    k.group_id,
                    chrono::Utc::now().format("%Y%m%dT%H%M%S")
                );
            }
            let sink = sink(&output, &cfg)?;
            let store = Store::open(&data_dir, &cfg)?;
            let k = cfg.pipeline.kafka.clone();
            let sources = match &input {
                Some(input) => vec![ingest::file::source_name(input)],
                None => vec![k.enrollments_topic.clone(), k.telemetry_topic.clone()],
            };
            let names: Vec<&str> = sources.iter().map(String::as_str).collect();
            let mut fold = Fold::new(cfg, store, &names)?;
            fold.set_day_filter(
                slipstream::event::Day::from_date(from),
                slipstream::event::Day::from_date(to),
            );
            let mut pipeline = Pipeline::new(fold, sink);
            let (what, lines, folded, rejected, published) = match (&input, &brokers) {
                (Some(input), _) => {
                    let s = ingest::file::replay(&mut pipeline, input)?;
                    (
                        input.display().to_string(),
                        s.lines,
                        s.folded,
                        s.rejected,
                        s.published,
                    )
                }
                (None, Some(brokers)) => {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    let mut opts = ingest::stream::RunOptions {
                        stop_at_end: true,
                        ..Default::default()
                    };
                    let s = rt.block_on(ingest::stream::run(
                        &mut pipeline,
                        brokers,
                        &mut opts,
                        shutdown_signal(),
                    ))?;
                    let stats = &pipeline.fold.stats;
                    let rejected = stats.rejected.iter().sum::<u64>();
                    (
                        format!(
                            "topics {} and {} on {brokers}",
                            k.enrollments_topic, k.telemetry_topic
                        ),
                        s.messages,
                        stats.folded,
                        rejected,
                        s.published,
                    )
                }
                (None, None) => unreachable!("clap requires --input or --brokers"),
            };
            let (statuses, report) = slipstream::finalize::finalize(&mut pipeline, to, None)?;
            println!(
                "backfilled {lines} events from {what} ({folded} folded, {} outside {from}..{to}, {rejected} rejected); published {} tables ({} rows) to {}",
                pipeline.fold.stats.skipped,
                published.tables + report.tables,
                published.rows + report.rows,
                pipeline.sink_description()
            );
            Ok(print_statuses(&statuses))
        }
        Command::Serve {
            config,
            data_dir,
            listen,
        } => {
            let cfg = Arc::new(load_config(&config)?);
            let store = Store::open(&data_dir, &cfg)?;
            let api = slipstream::http::Api::new(store, cfg).map_err(anyhow::Error::msg)?;
            api.ready.store(true, std::sync::atomic::Ordering::Relaxed);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!("serving on http://{}", listener.local_addr()?);
                slipstream::http::serve(listener, api, shutdown_signal()).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            brokers,
            data_dir,
            output,
            idle_exit_secs,
            listen,
        } => {
            let cfg = load_config(&config)?;
            let sink = sink(&output, &cfg)?;
            let store = Store::open(&data_dir, &cfg)?;
            let k = &cfg.pipeline.kafka;
            let sources = [k.enrollments_topic.clone(), k.telemetry_topic.clone()];
            let fold = Fold::new(cfg.clone(), store, &[&sources[0], &sources[1]])?;
            let mut pipeline = Pipeline::new(fold, sink);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let mut opts = ingest::stream::RunOptions {
                idle_exit: idle_exit_secs.map(std::time::Duration::from_secs),
                ..Default::default()
            };
            let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
            let server = match listen {
                Some(addr) => {
                    let api = slipstream::http::Api::with_metrics(
                        pipeline.fold.store().clone(),
                        Arc::new(cfg.clone()),
                        pipeline.metrics.clone(),
                    )
                    .map_err(anyhow::Error::msg)?;
                    opts.ready = Some(api.ready.clone());
                    let (finalize_tx, finalize_rx) = tokio::sync::mpsc::channel(4);
                    let _ = api.finalize.set(finalize_tx);
                    opts.finalize = Some(finalize_rx);
                    let listener = rt
                        .block_on(tokio::net::TcpListener::bind(&addr))
                        .with_context(|| format!("cannot listen on {addr}"))?;
                    eprintln!("serving on http://{}", listener.local_addr()?);
                    Some(rt.spawn(slipstream::http::serve(listener, api, async {
                        let _ = http_stopped.await;
                    })))
                }
                None => None,
            };
            let s = rt.block_on(ingest::stream::run(
                &mut pipeline,
                &brokers,
                &mut opts,
                shutdown_signal(),
            ))?;
            let _ = stop_http.send(());
            if let Some(server) = server {
                rt.block_on(server)??;
            }
            println!(
                "consumed {} messages: {} folded, {} rejected; published {} tables ({} rows) to {}",
                s.messages,
                pipeline.fold.stats.folded,
                pipeline.fold.stats.rejected.iter().sum::<u64>(),
                s.published.tables,
                s.published.rows,
                pipeline.sink_description()
            );
            if let Some(topic) = &cfg.pipeline.kafka.dead_letter_topic {
                println!(
                    "dead-letter topic {topic}: {} rejected messages delivered",
                    s.dead_letters
                );
            }
            if let (Some(first), Some(last)) = (s.first_message, s.last_message) {
                let secs = (last - first).as_secs_f64();
                println!(
                    "rate: {:.2}s from the first to the last message ({:.0} messages/s), then {:.2}s for the final flush and publication",
                    secs,
                    s.messages as f64 / secs.max(1e-9),
                    s.final_flush.as_secs_f64()
                );
            }
            let t = pipeline.times;
            print_times(&t);
            print_rejects(&pipeline);
            for f in &s.still_failing {
                eprintln!("publication failed: {f}");
            }
            Ok(if s.still_failing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Probe {
            ready,
            live: _,
            url,
            config,
            timeout_secs,
        } => {
            let pipeline = match &config {
                Some(c) => load_config(c)?.pipeline,
                None => Default::default(),
            };
            let token = if ready {
                slipstream::http::bearer_token(&pipeline).map_err(anyhow::Error::msg)?
            } else {
                None
            };
            let path = if ready { "/readyz" } else { "/healthz" };
            let url = format!("{}{path}", url.trim_end_matches('/'));
            let timeout = std::time::Duration::from_secs(timeout_secs);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let answer = rt.block_on(async {
                let client = reqwest::Client::builder().timeout(timeout).build()?;
                let mut req = client.get(&url);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let r = req.send().await?;
                let status = r.status();
                anyhow::Ok((status, r.text().await.unwrap_or_default()))
            });
            // One line, for the kubelet's event log.
            Ok(match answer {
                Ok((status, _)) if status.is_success() => {
                    println!("{url}: {status}");
                    ExitCode::SUCCESS
                }
                Ok((status, body)) => {
                    println!("{url}: {status}: {}", body.trim());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    println!("{url}: {e:#}");
                    ExitCode::FAILURE
                }
            })
        }
        Command::Replay {
            config,
            input,
            data_dir,
            output,
        } => {
            let cfg = load_config(&config)?;
            let sink = sink(&output, &cfg)?;
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
            print_times(&t);
            print_rejects(&pipeline);
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

/// The `time:` line of `replay` and `run` summaries (bench/ parses it).
fn print_times(t: &slipstream::pipeline::PhaseTimes) {
    println!(
        "time: {:.2}s writing state batches, {:.2}s merging the delta log before reads, {:.2}s materializing tables ({:.2}s of it measuring late changes), {:.2}s in the sink, the rest reading and folding",
        t.flush.as_secs_f64(),
        t.compact.as_secs_f64(),
        t.materialize.as_secs_f64(),
        t.late.as_secs_f64(),
        t.sink.as_secs_f64()
    );
}
