//! `strata vos`: the versioned object store of one target, without a cluster.

use std::path::PathBuf;
use strata_types::{ContId, Epoch, ObjectClass, ObjectType, Oid};
use strata_vos::{Update, UpdateOp, Vos, VosConfig};

#[derive(clap::Subcommand)]
pub enum VosCommand {
    /// Walk through versioned updates, reads at old epochs, punch, enumeration, aggregation
    /// and checksums on a throw-away target, printing each step.
    Demo {
        /// Directory for the target (default: a temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(c: VosCommand) -> anyhow::Result<()> {
    match c {
        VosCommand::Demo { dir } => demo(dir),
    }
}

fn show(v: Option<(Epoch, Vec<u8>)>) -> String {
    match v {
        Some((e, bytes)) => format!("{:?} (written at epoch {e})", String::from_utf8_lossy(&bytes)),
        None => "nothing".into(),
    }
}

fn demo(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let tmp;
    let path = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("strata-vos-demo-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    println!("== Strata VOS demo: one target's versioned object store at {}", path.display());
    let vos = Vos::open(&path, &VosConfig::default())?;
    let cont = ContId::new_random();
    let class: ObjectClass = "RP_3G1".parse()?;
    let oid = Oid::new(ObjectType::Plain, class, 1);
    println!("container {cont}\nobject    {oid}  (type and class live in the id's top bits)\n");

    let put = |e: u64, value: &str| -> anyhow::Result<()> {
        vos.update(&[Update { cont, oid, dkey: b"user:42".to_vec(), epoch: Epoch(e), op: UpdateOp::Single { akey: b"email".to_vec(), value: value.as_bytes().to_vec() } }])?;
        println!("update  epoch {e:>3}: dkey user:42 akey email = {value:?}   (durable when this line prints)");
        Ok(())
    };
    put(10, "ada@example.org")?;
    put(20, "ada@lovelace.dev")?;
    let get = |e: Epoch| vos.fetch_single(cont, oid, b"user:42", b"email", e);
    println!("fetch   epoch  15: {}", show(get(Epoch(15))?));
    println!("fetch   epoch  25: {}", show(get(Epoch(25))?));
    println!("fetch   epoch   5: {}   (before the first version)\n", show(get(Epoch(5))?));

    vos.update(&[Update { cont, oid, dkey: b"log".to_vec(), epoch: Epoch(30), op: UpdateOp::Extent { akey: b"bytes".to_vec(), offset: 0, data: b"hello, world".to_vec().into() } }])?;
    vos.update(&[Update { cont, oid, dkey: b"log".to_vec(), epoch: Epoch(40), op: UpdateOp::Extent { akey: b"bytes".to_vec(), offset: 7, data: b"strata".to_vec().into() } }])?;
    let r = vos.fetch_extent(cont, oid, b"log", b"bytes", 0, 16, Epoch(35))?;
    println!("array   epoch  35: {:?}", String::from_utf8_lossy(&r.data).trim_end_matches('\0'));
    let r = vos.fetch_extent(cont, oid, b"log", b"bytes", 0, 16, Epoch::MAX)?;
    println!("array   newest   : {:?}  written ranges {:?} (the rest is a hole, read as zeros)\n", String::from_utf8_lossy(&r.data).trim_end_matches('\0'), r.written);

    vos.update(&[Update { cont, oid, dkey: b"user:42".to_vec(), epoch: Epoch(50), op: UpdateOp::PunchDkey }])?;
    println!("punch   epoch  50: dkey user:42 (a versioned tombstone)");
    println!("fetch   epoch  45: {}", show(get(Epoch(45))?));
    println!("fetch   epoch  55: {}", show(get(Epoch(55))?));
    let dk = vos.list_dkeys(cont, oid, Epoch(45), None, 10)?;
    let names = |v: &Vec<Vec<u8>>| v.iter().map(|d| String::from_utf8_lossy(d).into_owned()).collect::<Vec<_>>();
    println!("list    epoch  45: dkeys {:?}", names(&dk.items));
    println!("list    epoch  55: dkeys {:?}\n", names(&vos.list_dkeys(cont, oid, Epoch(55), None, 10)?.items));

    let stats = vos.aggregate(cont, Epoch(60), &[Epoch(15)])?;
    println!("aggregate up to epoch 60, keeping snapshot 15: removed {} of {} records", stats.records_removed, stats.records_examined);
    println!("fetch   epoch  15: {}   (kept for the snapshot)", show(get(Epoch(15))?));
    println!("fetch   epoch  55: {}", show(get(Epoch(55))?));
    let scrub = vos.verify_all()?;
    println!("\nscrub: {} records, {} bytes checked, {} corrupt (crc32c on every record, every read)", scrub.records_checked, scrub.bytes_checked, scrub.corrupt.len());
    let space = vos.space()?;
    println!("space: {} bytes used, {} GiB free on the file system", space.used_bytes, space.fs_free_bytes >> 30);
    println!("\nNext: `strata bench vos` measures durable update rates against fio on this disk.");
    Ok(())
}
