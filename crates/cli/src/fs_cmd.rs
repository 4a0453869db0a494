//! `strata fs`: mount a POSIX volume with FUSE, unmount it, show a file's exNode layout, and
//! read a file as of a snapshot or epoch.
//!
//! `mount` runs in the background by default: it starts itself again with `--foreground`
//! (in a new session, logging to a file) and returns once the kernel lists the mount.

use crate::cluster_cmd::{block_on, pool_cont, Conn};
use crate::output::emit;
use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_fs::fuse_mount::{serve, MountOptions, StrataFs};
use strata_fs::mount_session::MountSession;
use strata_fs::volume::Volume;
use strata_types::Epoch;

/// How long `mount` waits for the background mount to appear, and `umount` for it to go.
const MOUNT_WAIT: Duration = Duration::from_secs(30);
/// The mount source shown in /proc/mounts: `strata:POOL/CONT`.
const FSNAME_PREFIX: &str = "strata:";

#[derive(Clone, Debug)]
pub enum MountOpt {
    ReadOnly,
    ReadWrite,
    AllowOther,
    /// Seconds the kernel caches entries and attributes.
    KernelTtl(f64),
    /// Take no directory leases: every metadata change is committed before it returns.
    NoLeases,
    /// File data the mount keeps in memory (read, read ahead and written), MiB.
    CacheMib(u64),
}

fn parse_mount_opt(s: &str) -> Result<MountOpt, String> {
    match s.split_once('=') {
        None if s == "ro" => Ok(MountOpt::ReadOnly),
        None if s == "rw" => Ok(MountOpt::ReadWrite),
        None if s == "allow_other" => Ok(MountOpt::AllowOther),
        None if s == "noleases" => Ok(MountOpt::NoLeases),
        Some(("cache_mib", v)) => v.parse::<u64>().ok().filter(|v| *v <= 1 << 20).map(MountOpt::CacheMib).ok_or_else(|| format!("'{s}': cache size must be 0..=1048576 MiB")),
        Some(("attr_timeout" | "entry_timeout", v)) => v.parse::<f64>().ok().filter(|v| *v >= 0.0 && *v <= 3600.0).map(MountOpt::KernelTtl).ok_or_else(|| format!("'{s}': timeout must be 0..=3600 seconds")),
        _ => Err(format!("unknown mount option '{s}' (ro, rw, allow_other, noleases, attr_timeout=SECONDS, cache_mib=MIB)")),
    }
}

#[derive(clap::Subcommand)]
pub enum FsCommand {
    /// Mount volume POOL/CONT (a container of type posix) on MOUNTPOINT.
    Mount {
        target: String,
        mountpoint: PathBuf,
        /// Serve in this process until unmounted (default: in the background).
        #[arg(long)]
        foreground: bool,
        /// Mount options, comma separated: ro, rw, allow_other, noleases, attr_timeout=SECONDS,
        /// cache_mib=MIB (file data kept in memory; default 1024, at most an eighth
        /// of the machine's memory).
        #[arg(short = 'o', value_delimiter = ',', value_parser = parse_mount_opt)]
        options: Vec<MountOpt>,
        /// Requests served at once.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// How long this mount trusts cached names and attributes (open always revalidates).
        #[arg(long, default_value_t = 1000)]
        meta_cache_ms: u64,
        /// Log file of a background mount (default: /tmp/strata-fs-<mountpoint>.log).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Lifetime of the mount's session lease: after it dies, other mounts reclaim the
        /// files it had unlinked while open this long after its last renewal.
        #[arg(long, default_value_t = strata_fs::mount_session::SESSION_TTL_MS_DEFAULT, hide = true)]
        session_ttl_ms: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Files unlinked while open (orphans) and whether the mount holding each is alive;
    /// `--reclaim` deletes those of dead mounts (running mounts do this by themselves).
    Orphans {
        /// POOL/CONT
        target: String,
        #[arg(long)]
        reclaim: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Unmount a strata mount point (the mount process then exits).
    Umount {
        mountpoint: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Where a file's data lives, as an exNode with per-shard capabilities.
    Layout {
        /// A path on a strata mount, or POOL/CONT:/PATH.
        path: String,
        /// exnode (the seed's text form) or json.
        #[arg(long, default_value = "exnode", value_parser = ["exnode", "json"])]
        format: String,
        /// Lifetime of the capabilities printed.
        #[arg(long, default_value_t = 3600)]
        cap_ttl_s: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a file as of a snapshot or epoch (default: now).
    Cat {
        /// A path on a strata mount, or POOL/CONT:/PATH.
        path: String,
        #[arg(long, conflicts_with = "epoch")]
        snapshot: Option<String>,
        #[arg(long)]
        epoch: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
}

struct MountEntry {
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn mounts() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            Some(MountEntry { mountpoint: PathBuf::from(unescape_mountinfo(mp)), fstype: post.next()?.to_owned(), source: unescape_mountinfo(post.next()?) })
        })
        .collect()
}

fn is_mounted(mp: &Path) -> bool {
    mounts().iter().any(|m| m.mountpoint == mp)
}

/// (POOL, CONT, path inside the volume) for a path on a mount or `POOL/CONT:/PATH`.
fn locate(path: &str) -> anyhow::Result<(String, String, String)> {
    if let Some((pc, rel)) = path.split_once(":/") {
        if !Path::new(path).exists() {
            let (p, c) = pool_cont(pc)?;
            return Ok((p, c, format!("/{rel}")));
        }
    }
    let abs = std::path::absolute(path).with_context(|| format!("'{path}'"))?;
    let best = mounts().into_iter().filter(|m| m.source.starts_with(FSNAME_PREFIX) && abs.starts_with(&m.mountpoint)).max_by_key(|m| m.mountpoint.as_os_str().len());
    let Some(m) = best else { bail!("'{path}' is neither on a strata mount nor of the form POOL/CONT:/PATH") };
    let (p, c) = pool_cont(&m.source[FSNAME_PREFIX.len()..])?;
    let rel = abs.strip_prefix(&m.mountpoint).unwrap_or(Path::new("")).to_string_lossy().into_owned();
    Ok((p, c, format!("/{rel}")))
}

fn fs_err(e: strata_fs::FsError, what: &str) -> anyhow::Error {
    match e {
        strata_fs::FsError::NotFound => anyhow::anyhow!("{what}: no such file or directory"),
        strata_fs::FsError::IsDir => anyhow::anyhow!("{what}: is a directory"),
        e => anyhow::anyhow!("{what}: {e}"),
    }
}

fn check_mountpoint(mp: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(mp)?;
    let md = std::fs::metadata(&abs).map_err(|e| anyhow::anyhow!("mount point {}: {e}; create it first (mkdir -p {})", abs.display(), abs.display()))?;
    anyhow::ensure!(md.is_dir(), "mount point {} is not a directory", abs.display());
    let canon = std::fs::canonicalize(&abs)?;
    anyhow::ensure!(!is_mounted(&canon), "{} is already a mount point (busy); unmount it first with `strata fs umount {}`", canon.display(), canon.display());
    Ok(canon)
}

fn fuse_ready() -> anyhow::Result<()> {
    anyhow::ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: load the fuse kernel module (modprobe fuse)");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn mount_foreground(target: &str, mp: &Path, opts: &[MountOpt], threads: usize, meta_cache_ms: u64, session_ttl_ms: u64, conn: &Conn) -> anyhow::Result<()> {
    let (pool, cont) = pool_cont(target)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("strata-fs-io").enable_all().build()?;
    let read_only = opts.iter().fold(false, |ro, o| match o {
        MountOpt::ReadOnly => true,
        MountOpt::ReadWrite => false,
        _ => ro,
    });
    let (vol, capacity, session) = rt.block_on(async {
        let client = conn.client().await?;
        let vol = Volume::open(&client, &pool, &cont).await.map_err(|e| anyhow::anyhow!("volume {pool}/{cont}: {e}"))?;
        let cap = vol.cont.pool.info().map(|i| i.size_bytes).unwrap_or(1 << 40);
        // A read-only mount unlinks nothing, so it needs no session; it reclaims nothing either.
        let session = if read_only { None } else { Some(MountSession::start(&vol, session_ttl_ms).await.map_err(|e| anyhow::anyhow!("volume {pool}/{cont}: {e}"))?) };
        anyhow::Ok((vol, cap, session))
    })?;
    // Stopped (and joined) before the runtime shuts down: a reaper still sleeping on the runtime's
    // timer when it goes away panics ("Tokio context ... being shutdown") at every unmount.
    let (stop_reaper, mut reaper_stopped) = tokio::sync::watch::channel(false);
    let mut reaper_thread = None;
    if let Some(s) = &session {
        // Reclaim what dead mounts left behind: now, then once per session lifetime.
        let (vol, own, period) = (vol.clone(), s.key.clone(), Duration::from_millis(session_ttl_ms.clamp(strata_fs::mount_session::SESSION_TTL_MS_MIN, 60_000)));
        // A thread of its own: metadata transactions are not `Send` futures (see fuse_mount).
        let h = rt.handle().clone();
        let reaper = move || async move {
            loop {
                tokio::select! {
                    r = strata_fs::mount_session::orphans(&vol, Some(&own), true) => match r {
                        Ok(list) if list.iter().any(|o| o.reclaimed) => tracing::info!(reclaimed = list.iter().filter(|o| o.reclaimed).count(), "reclaimed orphans of dead mounts"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "could not reclaim the orphans of dead mounts"),
                    },
                    _ = reaper_stopped.changed() => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = reaper_stopped.changed() => return,
                }
            }
        };
        reaper_thread = Some(std::thread::Builder::new().name("strata-fs-reaper".into()).spawn(move || h.block_on(reaper()))?);
    }
    let mut mo = MountOptions { threads: threads.clamp(1, 64), meta_cache: Duration::from_millis(meta_cache_ms), fsname: format!("{FSNAME_PREFIX}{pool}/{cont}"), capacity_bytes: capacity, ..Default::default() };
    for o in opts {
        match o {
            MountOpt::ReadOnly => mo.read_only = true,
            MountOpt::ReadWrite => mo.read_only = false,
            MountOpt::AllowOther => mo.allow_other = true,
            MountOpt::KernelTtl(s) => mo.kernel_ttl = Duration::from_secs_f64(*s),
            MountOpt::NoLeases => mo.dir_leases = false,
            MountOpt::CacheMib(m) => mo.read_cache_bytes = m << 20,
        }
    }
    let fs = StrataFs::new(rt.handle().clone(), vol.ns.clone(), vol.data.clone(), mo);
    let unmounter: Arc<Mutex<Option<fuser::SessionUnmounter>>> = Arc::default();
    let u2 = unmounter.clone();
    let mp_text = mp.display().to_string();
    rt.spawn(async move {
        let (Ok(mut int), Ok(mut term)) = (tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()), tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())) else { return };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if let Some(u) = u2.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = u.unmount();
        }
    });
    let served = serve(fs, mp, |u| {
        *unmounter.lock().unwrap_or_else(|e| e.into_inner()) = Some(u);
        println!("mounted {pool}/{cont} on {mp_text} (pid {})", std::process::id());
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving the mount on {}", mp.display()));
    let _ = stop_reaper.send(true);
    if let Some(t) = reaper_thread {
        let _ = t.join();
    }
    served?;
    if let Some(s) = session {
        rt.block_on(s.end());
    }
    Ok(())
}

fn mount_background(args: &[String], mp: &Path, log: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let logf = std::fs::File::create(log).with_context(|| format!("log file {}", log.display()))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args).arg("--foreground").stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
    // A new session: the mount outlives this shell's job control and its Ctrl-C.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let start = Instant::now();
    loop {
        if is_mounted(mp) {
            return Ok(child.id());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the mount process exited ({status}): {}", text.trim());
        }
        if start.elapsed() > MOUNT_WAIT {
            let _ = child.kill();
            bail!("{} did not appear as a mount within {MOUNT_WAIT:?}; see {}", mp.display(), log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes serving `strata fs mount ... MP` (found by their command line).
fn mount_processes(mp: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let is_mount = args.windows(2).any(|w| w[0] == b"fs" && w[1] == b"mount");
            // No file-system access here: another argument may name a hung mount.
            is_mount && args.iter().any(|a| std::str::from_utf8(a).ok().and_then(|a| std::path::absolute(a).ok()).is_some_and(|p| p == mp))
        })
        .collect()
}

pub fn run(c: FsCommand) -> anyhow::Result<()> {
    match c {
        FsCommand::Mount { target, mountpoint, foreground, options, threads, meta_cache_ms, log, session_ttl_ms, conn } => {
            fuse_ready()?;
            pool_cont(&target)?;
            let mp = check_mountpoint(&mountpoint)?;
            if foreground {
                return mount_foreground(&target, &mp, &options, threads, meta_cache_ms, session_ttl_ms, &conn);
            }
            let log = log.unwrap_or_else(|| PathBuf::from(format!("/tmp/strata-fs-{}.log", mp.display().to_string().replace('/', "_"))));
            let mut args: Vec<String> = vec!["fs".into(), "mount".into(), target.clone(), mp.display().to_string(), "--threads".into(), threads.to_string(), "--meta-cache-ms".into(), meta_cache_ms.to_string(), "--session-ttl-ms".into(), session_ttl_ms.to_string()];
            let opt_text: Vec<String> = options
                .iter()
                .map(|o| match o {
                    MountOpt::ReadOnly => "ro".to_string(),
                    MountOpt::ReadWrite => "rw".to_string(),
                    MountOpt::AllowOther => "allow_other".to_string(),
                    MountOpt::KernelTtl(s) => format!("attr_timeout={s}"),
                    MountOpt::NoLeases => "noleases".to_string(),
                    MountOpt::CacheMib(m) => format!("cache_mib={m}"),
                })
                .collect();
            if !opt_text.is_empty() {
                args.push("-o".into());
                args.push(opt_text.join(","));
            }
            if let Some(cf) = &conn.cluster {
                args.push("--cluster".into());
                args.push(std::path::absolute(cf)?.display().to_string());
            }
            let pid = mount_background(&args, &mp, &log)?;
            emit(conn.json, &serde_json::json!({"mounted": target, "mountpoint": mp, "pid": pid, "log": log}), |_| println!("mounted {target} on {} (pid {pid}, log {})", mp.display(), log.display()))
        }
        FsCommand::Umount { mountpoint, conn } => {
            let mp = std::fs::canonicalize(&mountpoint).or_else(|_| std::path::absolute(&mountpoint))?;
            let entry = mounts().into_iter().find(|m| m.mountpoint == mp);
            let Some(entry) = entry else { bail!("{} is not mounted", mp.display()) };
            anyhow::ensure!(entry.source.starts_with(FSNAME_PREFIX) && entry.fstype.starts_with("fuse"), "{} is not a strata mount ({} {})", mp.display(), entry.fstype, entry.source);
            let out = Command::new("fusermount3").arg("-u").arg(&mp).output();
            let ok = matches!(&out, Ok(o) if o.status.success());
            if !ok {
                let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())?;
                // Root needs no fusermount; a busy mount reports EBUSY here.
                if unsafe { libc::umount(c.as_ptr()) } != 0 {
                    let e = std::io::Error::last_os_error();
                    let why = out.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned()).unwrap_or_else(|e| e.to_string());
                    bail!("cannot unmount {}: {e} ({why}); close the files open on it and retry", mp.display());
                }
            }
            let servers = mount_processes(&mp);
            let start = Instant::now();
            while is_mounted(&mp) {
                anyhow::ensure!(start.elapsed() < MOUNT_WAIT, "{} still mounted after {MOUNT_WAIT:?}", mp.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            // The mount process commits what its directory leases hold after the kernel let
            // go of the mount point: return once it is done (and so never races a remount).
            while servers.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
                anyhow::ensure!(start.elapsed() < MOUNT_WAIT, "the mount process of {} still running after {MOUNT_WAIT:?}", mp.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            emit(conn.json, &serde_json::json!({"unmounted": mp}), |_| println!("unmounted {}", mp.display()))
        }
        FsCommand::Orphans { target, reclaim, conn } => block_on(async move {
            let (pool, cont) = pool_cont(&target)?;
            let client = conn.client().await?;
            let vol = Volume::open(&client, &pool, &cont).await.map_err(|e| anyhow::anyhow!("volume {pool}/{cont}: {e}"))?;
            let list = strata_fs::mount_session::orphans(&vol, None, reclaim).await.map_err(|e| anyhow::anyhow!("orphans of {pool}/{cont}: {e}"))?;
            emit(conn.json, &list, |list| {
                if list.is_empty() {
                    println!("no orphans in {pool}/{cont}");
                }
                for o in list {
                    let state = if o.reclaimed { "reclaimed" } else if o.alive { "held open by a live mount" } else { "mount is dead (reclaim with --reclaim)" };
                    println!("inode {:>12}  {state}  session {}", o.ino, if o.session.is_empty() { "?" } else { &o.session });
                }
            })
        }),
        FsCommand::Layout { path, format, cap_ttl_s, conn } => block_on(async move {
            let (pool, cont, rel) = locate(&path)?;
            let client = conn.client().await?;
            let vol = Volume::open(&client, &pool, &cont).await.map_err(|e| anyhow::anyhow!("volume {pool}/{cont}: {e}"))?;
            let x = vol.layout(&rel, cap_ttl_s.saturating_mul(1000)).await.map_err(|e| fs_err(e, &path))?;
            emit(conn.json || format == "json", &x, |x| print!("{}", strata_fs::exnode::render(x)))
        }),
        FsCommand::Cat { path, snapshot, epoch, conn } => block_on(async move {
            let (pool, cont, rel) = locate(&path)?;
            let client = conn.client().await?;
            let vol = Volume::open(&client, &pool, &cont).await.map_err(|e| anyhow::anyhow!("volume {pool}/{cont}: {e}"))?;
            let at = match (&snapshot, epoch) {
                (Some(name), _) => {
                    let info = client.container(&pool, &cont).await?.info;
                    match info.snapshots.get(name) {
                        Some(e) => *e,
                        None => bail!("no snapshot '{name}' of {pool}/{cont}; it has: {}", info.snapshots.keys().cloned().collect::<Vec<_>>().join(", ")),
                    }
                }
                (None, Some(e)) => Epoch(e),
                (None, None) => Epoch::MAX,
            };
            let i = vol.file_at(&rel, at).await.map_err(|e| fs_err(e, &path))?;
            if conn.json {
                let mut buf = Vec::new();
                vol.cat_at(&i, at, &mut buf).await.map_err(|e| fs_err(e, &path))?;
                return emit(true, &serde_json::json!({"path": rel, "epoch": at.0, "bytes": buf.len(), "text": String::from_utf8_lossy(&buf)}), |_| {});
            }
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            vol.cat_at(&i, at, &mut out).await.map_err(|e| fs_err(e, &path))?;
            out.flush()?;
            Ok(())
        }),
    }
}
