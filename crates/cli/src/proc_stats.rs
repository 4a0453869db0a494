//! What benchmarks read about processes on this machine from /proc: CPU time, and which local
//! processes serve given TCP ports (so a bench can count the engines' CPU when the cluster is
//! local, as it counts its peers').

use std::collections::HashSet;

/// CPU seconds (user + system) a process has used (0 when it is gone or unreadable).
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')';
    // utime and stime are the 14th and 15th of the whole line.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Socket inodes of TCP listeners on any of `ports` (IPv4 and IPv6 tables).
fn listener_inodes(ports: &HashSet<u16>) -> HashSet<u64> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is the 10th field.
            let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let port = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *st == "0A" && port.is_some_and(|p| ports.contains(&p)) {
                if let Ok(i) = inode.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// PIDs of the processes on this machine listening on any of `addrs` (`host:port`); empty
/// when none is local (a remote cluster) or /proc is not readable.
pub fn local_listener_pids<'a>(addrs: impl IntoIterator<Item = &'a str>) -> Vec<u32> {
    let ports: HashSet<u16> = addrs.into_iter().filter_map(|a| a.rsplit_once(':')?.1.parse().ok()).collect();
    let inodes = listener_inodes(&ports);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return pids };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        let serves = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).ok().and_then(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()).is_some_and(|i| inodes.contains(&i))
        });
        if serves {
            pids.push(pid);
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_by_its_listening_port_and_counts_its_cpu() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        assert_eq!(local_listener_pids([addr.as_str()]), vec![std::process::id()]);
        drop(l);
        assert!(local_listener_pids([addr.as_str()]).is_empty(), "a closed port is served by nobody");
        let t0 = proc_cpu_secs(std::process::id());
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(proc_cpu_secs(std::process::id()) > t0, "busy work shows as CPU time");
    }
}
