//! etcd as a benchmark peer: started by the bench on loopback ports (one member, or as many as
//! the Strata class has replicas) with its own data directory (fsync on, its default), driven
//! over its JSON gateway (`/v3/kv/*`) with a small keep-alive HTTP/1.1 client, stopped by its
//! PIDs when the bench ends.

use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long etcd may take to answer its health check after start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest HTTP response the client accepts.
const RESPONSE_BYTES_MAX: usize = 16 << 20;

pub struct Etcd {
    children: Vec<Child>,
    /// Client addresses, one per member.
    pub addrs: Vec<String>,
    dir: std::path::PathBuf,
}

pub fn available() -> bool {
    Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

use crate::up::free_port;

impl Etcd {
    /// Start an etcd cluster of `members` (1 = single node) with its data under `parent`:
    /// with three members every write is fsynced by three processes, as `RP_3` does.
    pub fn start(parent: &Path, members: usize) -> anyhow::Result<Etcd> {
        if !available() {
            bail!("etcd is not installed; the KV bench compares with it: `apt-get install etcd-server` (Debian), or pass --no-etcd");
        }
        anyhow::ensure!((1..=7).contains(&members), "etcd members must be 1..=7");
        let dir = parent.join(format!("etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut held = Vec::new();
        let ports: Vec<(u16, u16)> = (0..members).map(|_| Ok::<_, anyhow::Error>((free_port(&mut held)?, free_port(&mut held)?))).collect::<Result<_, _>>()?;
        drop(held);
        let initial: Vec<String> = ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let mut e = Etcd { children: Vec::new(), addrs: ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect(), dir };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(e.dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(e.dir.join(format!("data-{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}"), "--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}"), "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd")?;
            e.children.push(child);
        }
        let start = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        for addr in e.addrs.clone() {
            loop {
                let ok = rt.block_on(async {
                    let mut c = EtcdConn::connect(&addr).await.ok()?;
                    c.put(b"/bench/ready", b"1").await.ok()
                });
                if ok.is_some() {
                    break;
                }
                if start.elapsed() > START_TIMEOUT {
                    bail!("etcd did not start within {START_TIMEOUT:?}; see {}", e.dir.display());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(e)
    }

    /// CPU seconds the etcd processes used so far.
    pub fn cpu_secs(&self) -> f64 {
        self.children.iter().map(|c| crate::proc_stats::proc_cpu_secs(c.id())).sum()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One keep-alive connection to etcd's JSON gateway.
pub struct EtcdConn {
    io: BufReader<TcpStream>,
    host: String,
}

impl EtcdConn {
    pub async fn connect(addr: &str) -> anyhow::Result<EtcdConn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(EtcdConn { io: BufReader::new(s), host: addr.to_owned() })
    }

    async fn post(&mut self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let body = body.to_string();
        let req = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", self.host, body.len());
        self.io.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.io.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("bad HTTP status line {line:?}"))?;
        let mut len = None;
        let mut chunked = false;
        for _ in 0..100 {
            line.clear();
            self.io.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut data = Vec::new();
        if chunked {
            for _ in 0..10_000 {
                line.clear();
                self.io.read_line(&mut line).await?;
                let n = usize::from_str_radix(line.trim(), 16).context("bad chunk size")?;
                if data.len() + n > RESPONSE_BYTES_MAX {
                    bail!("etcd answer over {RESPONSE_BYTES_MAX} bytes");
                }
                let mut chunk = vec![0u8; n + 2];
                self.io.read_exact(&mut chunk).await?;
                data.extend_from_slice(&chunk[..n]);
                if n == 0 {
                    break;
                }
            }
        } else {
            let n = len.context("etcd answer without a length")?;
            if n > RESPONSE_BYTES_MAX {
                bail!("etcd answer over {RESPONSE_BYTES_MAX} bytes");
            }
            data.resize(n, 0);
            self.io.read_exact(&mut data).await?;
        }
        if status != 200 {
            bail!("etcd {path}: HTTP {status}: {}", String::from_utf8_lossy(&data[..data.len().min(200)]));
        }
        Ok(serde_json::from_slice(&data)?)
    }

    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        self.post("/v3/kv/put", &serde_json::json!({"key": b64(key), "value": b64(value)})).await.map(|_| ())
    }

    /// The value's length (values are not decoded) and mod revision (0 when absent).
    pub async fn get(&mut self, key: &[u8]) -> anyhow::Result<(Option<usize>, u64)> {
        let r = self.post("/v3/kv/range", &serde_json::json!({"key": b64(key)})).await?;
        let Some(kv) = r["kvs"].as_array().and_then(|a| a.first()) else { return Ok((None, 0)) };
        let rev = kv["mod_revision"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((kv["value"].as_str().map(str::len), rev))
    }

    /// Read two keys, then write both only if neither changed (etcd's optimistic transaction,
    /// the same shape as a KV transfer); retried on a failed compare. Returns the attempts.
    pub async fn transfer(&mut self, a: &[u8], b: &[u8], value: &[u8]) -> anyhow::Result<u32> {
        for attempt in 1..=1000 {
            let (_, ra) = self.get(a).await?;
            let (_, rb) = self.get(b).await?;
            let cmp = |k: &[u8], r: u64| serde_json::json!({"key": b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()});
            let put = |k: &[u8]| serde_json::json!({"request_put": {"key": b64(k), "value": b64(value)}});
            let body = serde_json::json!({"compare": [cmp(a, ra), cmp(b, rb)], "success": [put(a), put(b)]});
            let r = self.post("/v3/kv/txn", &body).await?;
            if r["succeeded"].as_bool() == Some(true) {
                return Ok(attempt);
            }
        }
        bail!("etcd transaction kept failing its compare")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::b64(b""), "");
        assert_eq!(super::b64(b"f"), "Zg==");
        assert_eq!(super::b64(b"fo"), "Zm8=");
        assert_eq!(super::b64(b"foo"), "Zm9v");
        assert_eq!(super::b64(b"foobar"), "Zm9vYmFy");
    }
}
