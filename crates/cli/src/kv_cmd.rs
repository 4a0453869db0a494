//! `strata kv`: the transactional KV store of a container of type `kv`.

use crate::cluster_cmd::{block_on, pool_cont, Conn};
use crate::output::emit;
use anyhow::Context;
use std::collections::BTreeMap;
use std::io::Read;
use strata_kv::txn_script::{self, TxnOp};
use strata_kv::{Epoch, KvError, KvStore};
use strata_rpc::mgmt_msg::{ContType, MgmtCmd, MgmtReply};
use strata_types::ContId;

/// How many times `strata kv txn` runs a script again after a retryable conflict.
const TXN_ATTEMPTS_MAX: u32 = 20;

#[derive(clap::Subcommand)]
pub enum KvCommand {
    /// Create a KV store (a container of type kv) with a shard function and object class.
    Create {
        /// POOL/CONT
        store: String,
        /// Shard function: hash[:SHARDS] (default hash:64), range:SPLIT1,SPLIT2,..., prefix:N[:SHARDS].
        #[arg(long, default_value = "hash")]
        shard: String,
        /// Object class of the store; `auto`: RP_3GX with 3 or more ranks, else RP_2GX or SX
        /// (shards spread over the pool's targets).
        #[arg(long, default_value = "auto")]
        oclass: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Read a key (the newest value, or as of a snapshot with --at).
    Get {
        store: String,
        key: String,
        /// Snapshot name or epoch to read at.
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set a key (VALUE, or stdin when VALUE is omitted).
    Put {
        store: String,
        key: String,
        value: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a key.
    Del {
        store: String,
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Compare-and-set: set KEY to NEW only if it holds EXPECTED ('-' = absent; NEW '-' deletes).
    Cas {
        store: String,
        key: String,
        expected: String,
        new: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Keys in [START, END) in key order, across shards.
    Scan {
        store: String,
        #[arg(default_value = "")]
        start: String,
        end: Option<String>,
        /// Most keys to print.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Read at a snapshot (name or epoch) instead of now.
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a transaction script from stdin (get/put/del/cas/scan, one per line), atomically.
    Txn {
        store: String,
        /// Refuse to commit later than this after the transaction began (nothing is written).
        #[arg(long, default_value_t = 30_000)]
        deadline_ms: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Which shard and which ranks hold a key.
    Locate {
        store: String,
        key: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Snapshots: consistent cuts across all shards, readable with --at.
    #[command(subcommand)]
    Snapshot(KvSnapCommand),
}

#[derive(clap::Subcommand)]
pub enum KvSnapCommand {
    /// Snapshot the store now under NAME; `get`/`scan --at NAME` read it later.
    Create {
        store: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The store's snapshots: name and epoch.
    List {
        store: String,
        #[command(flatten)]
        conn: Conn,
    },
}

async fn open(conn: &Conn, store: &str) -> anyhow::Result<KvStore> {
    let (p, c) = pool_cont(store)?;
    let cont = conn.client().await?.container(&p, &c).await.with_context(|| format!("cannot open KV store '{store}'"))?;
    Ok(KvStore::open(&cont).await?)
}

async fn at_epoch(kv: &KvStore, at: Option<&str>) -> anyhow::Result<Option<Epoch>> {
    let Some(a) = at else { return Ok(None) };
    match kv.snapshot_epoch(a).await {
        Ok(e) => Ok(Some(e)),
        Err(KvError::NoSnapshot { .. }) if a.parse::<u64>().is_ok() => Ok(Some(Epoch(a.parse()?))),
        Err(e) => Err(e.into()),
    }
}

/// A value for JSON: text when it is UTF-8, else hex under another field name.
fn jv(v: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(v) {
        Ok(s) => serde_json::Value::String(s.to_owned()),
        Err(_) => serde_json::json!({ "hex": v.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
    }
}

fn txt(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn opt_value(s: &str) -> Option<&[u8]> {
    (s != "-").then_some(s.as_bytes())
}

pub fn run(c: KvCommand) -> anyhow::Result<()> {
    block_on(async move {
        match c {
            KvCommand::Create { store, shard, oclass, conn } => {
                let (pool, label) = pool_cont(&store)?;
                let f: strata_kv::shard_map::ShardFunction = shard.parse()?;
                let class: strata_types::ObjectClass = if oclass == "auto" {
                    let ranks = conn.client().await?.pool(&pool).await?.info()?.map.ranks().len();
                    match ranks {
                        0 | 1 => "SX",
                        2 => "RP_2GX",
                        _ => "RP_3GX",
                    }
                    .parse()?
                } else {
                    oclass.parse()?
                };
                let props = BTreeMap::from([(strata_kv::PROP_SHARD.to_owned(), f.to_string()), (strata_kv::PROP_OCLASS.to_owned(), class.to_string())]);
                let cmd = MgmtCmd::ContCreate { id: ContId::new_random(), pool, label, ctype: ContType::Kv, oclass: class.to_string(), rf: class.redundancy_factor() as u8, props };
                let MgmtReply::Cont(info) = conn.write(cmd).await? else { anyhow::bail!("unexpected reply") };
                // Opening checks the class fits the pool.
                open(&conn, &store).await?;
                emit(conn.json, &serde_json::json!({"store": store, "id": info.id.to_string(), "shard": f.to_string(), "oclass": class.to_string()}), |_| println!("KV store {store} created: shards {f}, class {class}"))
            }
            KvCommand::Get { store, key, at, conn } => {
                let kv = open(&conn, &store).await?;
                let v = match at_epoch(&kv, at.as_deref()).await? {
                    Some(e) => kv.get_at(key.as_bytes(), e).await?,
                    None => kv.get(key.as_bytes()).await?,
                };
                match v {
                    Some(v) => emit(conn.json, &serde_json::json!({"key": key, "value": jv(&v), "found": true}), |_| println!("{}", txt(&v))),
                    None if conn.json => emit(true, &serde_json::json!({"key": key, "value": null, "found": false}), |_| {}),
                    None => anyhow::bail!("key '{key}' not found in {store}"),
                }
            }
            KvCommand::Put { store, key, value, conn } => {
                let v = match value {
                    Some(v) => v.into_bytes(),
                    None => {
                        let mut b = Vec::new();
                        std::io::stdin().take(strata_kv::VALUE_BYTES_MAX as u64 + 1).read_to_end(&mut b)?;
                        b
                    }
                };
                let kv = open(&conn, &store).await?;
                let e = kv.put(key.as_bytes(), &v).await?;
                emit(conn.json, &serde_json::json!({"key": key, "epoch": e.0, "bytes": v.len()}), |_| println!("put {key} ({} bytes) at epoch {e}", v.len()))
            }
            KvCommand::Del { store, key, conn } => {
                let kv = open(&conn, &store).await?;
                let e = kv.delete(key.as_bytes()).await?;
                emit(conn.json, &serde_json::json!({"key": key, "epoch": e.0, "deleted": true}), |_| println!("deleted {key} at epoch {e}"))
            }
            KvCommand::Cas { store, key, expected, new, conn } => {
                let kv = open(&conn, &store).await?;
                match kv.cas(key.as_bytes(), opt_value(&expected), opt_value(&new)).await {
                    Ok(e) => emit(conn.json, &serde_json::json!({"key": key, "epoch": e.0, "swapped": true}), |_| println!("{key} swapped at epoch {e}")),
                    Err(e) => Err(e.into()),
                }
            }
            KvCommand::Scan { store, start, end, limit, at, conn } => {
                let kv = open(&conn, &store).await?;
                let end_b = end.as_deref().map(str::as_bytes);
                let rows = match at_epoch(&kv, at.as_deref()).await? {
                    Some(e) => kv.scan_at(start.as_bytes(), end_b, limit, e).await?,
                    None => kv.scan(start.as_bytes(), end_b, limit).await?,
                };
                let out: Vec<serde_json::Value> = rows.iter().map(|(k, v)| serde_json::json!({"key": jv(k), "value": jv(v)})).collect();
                emit(conn.json, &out, |_| {
                    for (k, v) in &rows {
                        println!("{}\t{}", txt(k), txt(v));
                    }
                })
            }
            KvCommand::Txn { store, deadline_ms, conn } => {
                let mut script = String::new();
                std::io::stdin().take(64 << 20).read_to_string(&mut script).context("reading the transaction script from stdin")?;
                let ops = txn_script::parse(&script)?;
                let kv = open(&conn, &store).await?;
                let mut attempt = 0;
                let (epoch, results) = loop {
                    attempt += 1;
                    match run_script(&kv, &ops, std::time::Duration::from_millis(deadline_ms)).await {
                        Ok(r) => break r,
                        Err(e) if e.is_retryable() && attempt < TXN_ATTEMPTS_MAX => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                emit(conn.json, &serde_json::json!({"committed": true, "epoch": epoch.0, "attempts": attempt, "results": results}), |v| {
                    for r in v["results"].as_array().into_iter().flatten() {
                        println!("{}", r["text"].as_str().unwrap_or_default());
                    }
                    println!("committed at epoch {epoch}");
                })
            }
            KvCommand::Locate { store, key, conn } => {
                let kv = open(&conn, &store).await?;
                let loc = kv.locate(key.as_bytes())?;
                emit(conn.json, &loc, |l| {
                    println!("key '{key}': shard {} (group {}), leader {}", l.shard, l.group, l.leader.as_deref().unwrap_or("none (group unavailable)"));
                    for r in &l.replicas {
                        println!("  replica {r}");
                    }
                })
            }
            KvCommand::Snapshot(KvSnapCommand::Create { store, name, conn }) => {
                let kv = open(&conn, &store).await?;
                let e = kv.snapshot_create(&name).await?;
                emit(conn.json, &serde_json::json!({"name": name, "epoch": e.0}), |_| println!("snapshot {name} at epoch {e}"))
            }
            KvCommand::Snapshot(KvSnapCommand::List { store, conn }) => {
                let kv = open(&conn, &store).await?;
                let snaps = kv.snapshots().await?;
                emit(conn.json, &snaps, |s| {
                    for (n, e) in s {
                        println!("{n}\t{e}");
                    }
                })
            }
        }
    })
}

/// One attempt at a script: every result, then the commit epoch.
async fn run_script(kv: &KvStore, ops: &[TxnOp], deadline: std::time::Duration) -> Result<(Epoch, Vec<serde_json::Value>), KvError> {
    let mut t = kv.begin();
    t.set_deadline(deadline);
    let mut results = Vec::new();
    for op in ops {
        let r = match op {
            TxnOp::Get { key } => {
                let v = t.get(key).await?;
                let text = format!("{} = {}", txt(key), v.as_deref().map(txt).unwrap_or_else(|| "(absent)".into()));
                serde_json::json!({"op": "get", "key": jv(key), "value": v.as_deref().map(jv), "text": text})
            }
            TxnOp::Put { key, value } => {
                t.put(key, value)?;
                serde_json::json!({"op": "put", "key": jv(key), "text": format!("put {}", txt(key))})
            }
            TxnOp::Delete { key } => {
                t.delete(key)?;
                serde_json::json!({"op": "del", "key": jv(key), "text": format!("del {}", txt(key))})
            }
            TxnOp::Cas { key, expected, value } => {
                t.cas(key, expected.as_deref(), Some(value)).await?;
                serde_json::json!({"op": "cas", "key": jv(key), "text": format!("cas {} ok", txt(key))})
            }
            TxnOp::Scan { start, end, limit } => {
                let rows = t.scan(start, Some(end), *limit).await?;
                let text = rows.iter().map(|(k, v)| format!("{}\t{}", txt(k), txt(v))).collect::<Vec<_>>().join("\n");
                let rows: Vec<serde_json::Value> = rows.iter().map(|(k, v)| serde_json::json!({"key": jv(k), "value": jv(v)})).collect();
                serde_json::json!({"op": "scan", "rows": rows, "text": text})
            }
        };
        results.push(r);
    }
    let e = t.commit().await?;
    Ok((e, results))
}
