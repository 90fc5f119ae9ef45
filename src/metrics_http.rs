//! The Prometheus endpoint of `obd tcmu` (`exporterConfig`): a thread that
//! answers `GET <uriPrefix>` on the configured port with the counters of
//! every disk served (`kmod_compat::metrics`), and 404 otherwise. One small
//! request per scrape: no HTTP library needed.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kmod_compat::metrics::Metrics;
use overlaybd::config::ExporterConfig;

/// Listen on all addresses at `config.port` (as the reference's exporter)
/// and serve scrapes in a background thread.
pub fn start(config: &ExporterConfig, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", config.port))
        .with_context(|| format!("exporterConfig.port {}", config.port))?;
    serve(listener, config.uri_prefix.clone(), metrics)
}

/// Serve scrapes arriving on `listener` in a background thread.
pub fn serve(listener: TcpListener, prefix: String, metrics: Arc<Metrics>) -> Result<()> {
    std::thread::Builder::new()
        .name("obd-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // A client that stalls or misbehaves only loses its answer.
                let _ = answer(stream, &prefix, &metrics);
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}

fn answer(stream: TcpStream, prefix: &str, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers are not needed; read them so the client sees a clean close.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = if method == "GET" && path == prefix {
        ("200 OK", metrics.render())
    } else {
        (
            "404 Not Found",
            format!("not found; metrics are at {prefix}\n"),
        )
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmod_compat::metrics::DiskStats;
    use kmod_compat::scsi::{Command, GOOD};
    use std::io::Read;

    fn get(port: u16, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    /// A scrape gets every disk's counters, and promtool (Prometheus' own
    /// checker, from Debian's package: scripts/promtool.sh) accepts them.
    #[test]
    fn scrapes_pass_promtool() {
        let metrics = Arc::new(Metrics::default());
        let stats = Arc::new(DiskStats::default());
        stats.record(
            Some(Command::Read { lba: 0, blocks: 8 }),
            GOOD,
            512,
            Duration::from_millis(1),
        );
        metrics.add("/var/lib/img/config.v1.json", stats);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        serve(listener, "/metrics".into(), metrics).unwrap();
        let answer = get(port, "/metrics");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        assert!(body
            .contains("obd_device_read_bytes_total{config=\"/var/lib/img/config.v1.json\"} 4096"));
        assert!(get(port, "/other").starts_with("HTTP/1.1 404"));

        let root = env!("CARGO_MANIFEST_DIR");
        let found = std::process::Command::new("bash")
            .arg(format!("{root}/scripts/promtool.sh"))
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "no promtool: {}",
            String::from_utf8_lossy(&found.stderr)
        );
        let promtool = String::from_utf8(found.stdout).unwrap().trim().to_string();
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
