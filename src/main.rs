use clap::Parser;

/// mimalloc instead of glibc malloc: the data path allocates many small, short-lived buffers per
/// statement, and glibc's malloc/free/consolidate took 11-13% of the edge's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // One TLS crypto provider for every crate (tonic, async-nats, rustls): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = custos_cli::Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // The log, and OTLP span export when this command is a daemon with an endpoint configured.
    let telemetry = {
        let _in_runtime = rt.enter();
        custos_cli::telemetry::install(custos_cli::telemetry::config_for(&cli))
    };
    let code = match rt.block_on(custos_cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    rt.block_on(telemetry.shutdown());
    std::process::exit(code);
}
