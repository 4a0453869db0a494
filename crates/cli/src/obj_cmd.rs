//! `strata obj`: create, write, read, punch and list objects directly.

use crate::cluster_cmd::{block_on, pool_cont, Conn};
use crate::output::emit;
use std::io::{Read, Write};
use std::path::PathBuf;
use strata_types::{Epoch, ObjectClass, Oid};

#[derive(clap::Subcommand)]
pub enum ObjCommand {
    /// Allocate a new object id in POOL/CONT and print it.
    Create {
        /// POOL/CONT.
        target: String,
        /// Object class (default: the container's).
        #[arg(long)]
        oclass: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a single value (from --value, --file, or stdin). Without OID, creates an object.
    Put {
        /// POOL/CONT.
        target: String,
        /// Object id as printed by `obj create` or `obj put` (e.g. plain.RP_3G1.1); none: a new object.
        oid: Option<String>,
        /// Distribution key: chooses the redundancy group (values of one dkey are stored together).
        #[arg(long)]
        dkey: String,
        /// Attribute key under the dkey: names the value.
        #[arg(long)]
        akey: String,
        /// The value, as text (else --file, else stdin).
        #[arg(long)]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Class of the new object when no OID is given (default: the container's), e.g. S1, RP_3G1, EC_2P1G1.
        #[arg(long)]
        oclass: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Read a single value to stdout (or --file); `--epoch` reads an older version.
    Get {
        /// POOL/CONT (not with --cap: the capability names it).
        #[arg(required_unless_present = "cap")]
        target: Option<String>,
        /// Object id as printed by `obj create` or `obj put`.
        #[arg(required_unless_present = "cap")]
        oid: Option<String>,
        /// Distribution key.
        #[arg(long, required_unless_present = "chunk")]
        dkey: Option<String>,
        /// Attribute key.
        #[arg(long)]
        akey: String,
        /// Read the newest version at or below this epoch (e.g. a snapshot's, from `cont snapshot list`).
        #[arg(long)]
        epoch: Option<u64>,
        /// Write the value to this file instead of stdout.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Read with only a capability (a read_cap from `strata fs layout`): one shard.
        #[arg(long)]
        cap: Option<String>,
        /// The dkey as a big-endian 64-bit number (a file-system chunk index).
        #[arg(long, conflicts_with = "dkey")]
        chunk: Option<u64>,
        /// Read an array extent of this many bytes from --offset instead of a single value.
        #[arg(long)]
        len: Option<u64>,
        /// Byte offset of an array read (with --len).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Punch (delete, versioned) an object, a dkey or an akey.
    Punch {
        /// POOL/CONT.
        target: String,
        /// Object id.
        oid: String,
        /// Punch only this dkey (default: the whole object).
        #[arg(long)]
        dkey: Option<String>,
        /// Punch only this akey of --dkey.
        #[arg(long)]
        akey: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the objects of a container, or the dkeys of one object.
    List {
        /// POOL/CONT.
        target: String,
        /// List this object's dkeys instead of the container's objects.
        oid: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

pub fn run(c: ObjCommand) -> anyhow::Result<()> {
    block_on(async move {
        match c {
            ObjCommand::Create { target, oclass, conn } => {
                let (p, ct) = pool_cont(&target)?;
                let cont = conn.client().await?.container(&p, &ct).await?;
                let class: ObjectClass = oclass.as_deref().unwrap_or(&cont.info.oclass).parse()?;
                let obj = cont.create_object(class).await?;
                emit(conn.json, &serde_json::json!({"oid": obj.oid.to_string()}), |_| println!("{}", obj.oid))
            }
            ObjCommand::Put { target, oid, dkey, akey, value, file, oclass, conn } => {
                let (p, ct) = pool_cont(&target)?;
                let data = match (value, file) {
                    (Some(v), _) => v.into_bytes(),
                    (None, Some(f)) => std::fs::read(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
                    (None, None) => {
                        let mut b = Vec::new();
                        std::io::stdin().read_to_end(&mut b)?;
                        b
                    }
                };
                let cont = conn.client().await?.container(&p, &ct).await?;
                let obj = match oid {
                    Some(o) => cont.object(o.parse::<Oid>()?),
                    None => cont.create_object(oclass.as_deref().unwrap_or(&cont.info.oclass).parse()?).await?,
                };
                let epoch = obj.put(dkey.as_bytes(), akey.as_bytes(), &data).await?;
                emit(conn.json, &serde_json::json!({"oid": obj.oid.to_string(), "epoch": epoch.0, "bytes": data.len()}), |_| {
                    // Only the id on stdout, so that `OID=$(strata obj put ...)` works; the
                    // rest is for the person watching.
                    println!("{}", obj.oid);
                    eprintln!("wrote {} bytes at epoch {epoch}", data.len());
                })
            }
            ObjCommand::Get { target, oid, dkey, akey, epoch, file, cap, chunk, len, offset, conn } => {
                let dkey_bytes = match (&dkey, chunk) {
                    (_, Some(c)) => c.to_be_bytes().to_vec(),
                    (Some(d), None) => d.as_bytes().to_vec(),
                    (None, None) => anyhow::bail!("give --dkey or --chunk"),
                };
                let dkey = dkey.unwrap_or_else(|| format!("chunk {}", chunk.unwrap_or_default()));
                let epoch = epoch.map_or(Epoch::MAX, Epoch);
                let (oid, v) = match cap {
                    Some(token) => {
                        use strata_rpc::engine_msg::FetchKind;
                        let fetch = match len {
                            Some(len) => FetchKind::Extent { akey: akey.as_bytes().to_vec(), offset, len },
                            None => FetchKind::Single { akey: akey.as_bytes().to_vec() },
                        };
                        let (found, _, data) = conn.client().await?.cap_fetch(&token, &dkey_bytes, fetch, epoch).await?;
                        let oid = strata_rpc::capability::peek(&token).map(|c| c.oid.to_string()).unwrap_or_default();
                        (oid, (len.is_some() || found.is_some()).then(|| data.to_vec()))
                    }
                    None => {
                        let (Some(target), Some(oid)) = (target, oid) else { anyhow::bail!("give POOL/CONT and OID, or --cap") };
                        let (p, ct) = pool_cont(&target)?;
                        let cont = conn.client().await?.container(&p, &ct).await?;
                        let obj = cont.object(oid.parse::<Oid>()?);
                        let v = match len {
                            Some(len) => Some(obj.read(&dkey_bytes, akey.as_bytes(), offset, len, epoch).await?.0),
                            None => obj.get_at(&dkey_bytes, akey.as_bytes(), epoch).await?,
                        };
                        (oid, v)
                    }
                };
                let Some(v) = v else { anyhow::bail!("no value at {oid} dkey '{dkey}' akey '{akey}'") };
                if conn.json {
                    return emit(true, &serde_json::json!({"oid": oid, "value": String::from_utf8_lossy(&v), "bytes": v.len()}), |_| {});
                }
                match file {
                    Some(f) => std::fs::write(&f, &v).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
                    None => std::io::stdout().write_all(&v)?,
                }
                Ok(())
            }
            ObjCommand::Punch { target, oid, dkey, akey, conn } => {
                let (p, ct) = pool_cont(&target)?;
                let cont = conn.client().await?.container(&p, &ct).await?;
                let obj = cont.object(oid.parse::<Oid>()?);
                match (dkey, akey) {
                    (Some(d), Some(a)) => drop(obj.punch_akey(d.as_bytes(), a.as_bytes()).await?),
                    (Some(d), None) => drop(obj.punch_dkey(d.as_bytes()).await?),
                    (None, None) => obj.punch().await?,
                    (None, Some(_)) => anyhow::bail!("--akey needs --dkey"),
                }
                emit(conn.json, &serde_json::json!({"punched": oid}), |_| println!("punched"))
            }
            ObjCommand::List { target, oid, conn } => {
                let (p, ct) = pool_cont(&target)?;
                let cont = conn.client().await?.container(&p, &ct).await?;
                match oid {
                    None => {
                        let oids: Vec<String> = cont.list_objects(Epoch::MAX).await?.iter().map(|o| o.to_string()).collect();
                        emit(conn.json, &oids, |l| l.iter().for_each(|o| println!("{o}")))
                    }
                    Some(o) => {
                        let keys: Vec<String> = cont.object(o.parse::<Oid>()?).list_dkeys(Epoch::MAX).await?.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
                        emit(conn.json, &keys, |l| l.iter().for_each(|k| println!("{k}")))
                    }
                }
            }
        }
    })
}
