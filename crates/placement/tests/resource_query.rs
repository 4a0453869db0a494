//! The resource query in both spellings against a small, varied set of targets.

use std::collections::BTreeMap;
use strata_placement::resource_query::{parse, select, SelectError};
use strata_placement::{FaultDomain, PoolTarget, TargetState};
use strata_types::TargetId;

fn targets() -> Vec<(TargetId, BTreeMap<String, String>)> {
    let spec = [
        ("/zone-a/rack-1/host-1", "ssd", false),
        ("/zone-a/rack-1/host-2", "ssd", false),
        ("/zone-a/rack-2/host-3", "hdd", false),
        ("/zone-b/rack-3/host-4", "ssd", false),
        ("/zone-b/rack-3/host-4", "nvme", false),
        ("/zone-b/rack-4/host-5", "hdd", true),
    ];
    spec.iter()
        .enumerate()
        .map(|(r, (dom, media, gpu))| {
            let mut labels = BTreeMap::from([("media".to_string(), media.to_string())]);
            if *gpu {
                labels.insert("gpu".into(), "yes".into());
            }
            let t = PoolTarget { id: TargetId::new(r as u32, 0), domain: FaultDomain::parse(dom).unwrap(), labels, state: TargetState::Up, out_since: 0 };
            (t.id, t.attributes())
        })
        .collect()
}

fn ranks(q: &str, n: Option<usize>) -> Result<Vec<u32>, String> {
    let query = parse(q).map_err(|e| e.to_string())?;
    select(&query, &targets(), n).map(|v| v.into_iter().map(|t| t.rank.0).collect()).map_err(|e| e.to_string())
}

#[test]
fn table_of_expressions_in_both_forms() {
    let all = vec![0, 1, 2, 3, 4, 5];
    let cases: Vec<(&str, Option<&str>, Option<usize>, Vec<u32>)> = vec![
        ("media=ssd", Some("1:media:1:ssd:1"), None, vec![0, 1, 3]),
        ("media!=ssd", Some("1:media:1:ssd:1.2:any:3:any:3"), None, vec![2, 4, 5]),
        ("media=ssd and zone=zone-b", Some("1:media:1:ssd:1.1:zone:1:zone-b:1.3:any:3:any:3"), None, vec![3]),
        ("media=ssd or media=hdd", Some("1:media:1:ssd:1.1:media:1:hdd:1.4:any:3:any:3"), None, vec![0, 1, 2, 3, 5]),
        ("not zone=zone-a", Some("1:zone:1:zone-a:1.2:any:3:any:3"), None, vec![3, 4, 5]),
        ("host=host-*", Some("1:host:1:host-:2"), None, all.clone()),
        ("media=s*", Some("1:media:1:s:2"), None, vec![0, 1, 3]),
        ("gpu=*", Some("1:gpu:1:any:3"), None, vec![5]),
        ("unique(host)", Some("1:host:1|64:any:3"), None, vec![0, 1, 2, 3, 5]),
        ("unique(rack)", Some("1:rack:65:any:3"), None, vec![0, 2, 3, 5]),
        ("same(zone)", Some("1:zone:1|128:any:3"), None, vec![0, 1, 2]),
        ("media=ssd and unique(zone)", Some("1:media:1:ssd:1.1:zone:1|64:any:3.3:any:3:any:3"), None, vec![0, 3]),
        ("(media=ssd or media=nvme) and zone=zone-b", Some("1:media:1:ssd:1.1:media:1:nvme:1.4:any:3:any:3.1:zone:1:zone-b:1.3:any:3:any:3"), None, vec![3, 4]),
        ("rank=2", Some("1:rank:1:2:1"), None, vec![2]),
        ("target=5:0", None, None, vec![5]),
        ("domain=/zone-b*", Some("1:domain:1:/zone-b:2"), None, vec![3, 4, 5]),
        ("not (media=ssd or media=hdd)", Some("1:media:1:ssd:1.1:media:1:hdd:1.4:any:3:any:3.2:any:3:any:3"), None, vec![4]),
        ("media=hdd and not gpu=yes", Some("1:media:1:hdd:1.1:gpu:1:yes:1.2:any:3:any:3.3:any:3:any:3"), None, vec![2]),
        ("*", Some("1:any:3:any:3"), None, all.clone()),
        ("same(rack) and media=ssd", Some("1:rack:1|128:any:3.1:media:1:ssd:1.3:any:3:any:3"), None, vec![0, 1]),
        ("unique(zone) and unique(media)", Some("1:zone:1|64:any:3.1:media:1|64:any:3"), None, vec![0]),
        ("media=ssd", Some("1:media:1:ssd:1"), Some(2), vec![0, 1]),
        ("rack=rack-3 or rack=rack-4", Some("1:rack:1:rack-3:1.1:rack:1:rack-4:1.4:any:3:any:3"), None, vec![3, 4, 5]),
        ("zone=zone-a and rack=rack-1 and host=host-2", Some("1:zone:1:zone-a:1.1:rack:1:rack-1:1.3:any:3:any:3.1:host:1:host-2:1.3:any:3:any:3"), None, vec![1]),
        ("media=nvme or gpu=yes", Some("1:media:1:nvme:1.1:gpu:1:yes:1.4:any:3:any:3"), None, vec![4, 5]),
        ("not not media=hdd", Some("1:media:1:hdd:1.2:any:3:any:3.2:any:3:any:3"), None, vec![2, 5]),
        ("*=ssd", Some("1:any:3:ssd:1"), None, vec![0, 1, 3]),
        ("state=UP", Some("1:state:1:UP:1"), None, all.clone()),
        ("media=ssd or media=hdd and zone=zone-b", Some("1:media:1:ssd:1.1:media:1:hdd:1.1:zone:1:zone-b:1.3:any:3:any:3.4:any:3:any:3"), None, vec![0, 1, 3, 5]),
        ("host=host-4 and unique(host)", Some("1:host:1:host-4:1.1:host:1|64:any:3.3:any:3:any:3"), None, vec![3]),
        ("media=ssd and zone=zone-a", Some("1:media:1:ssd:1.1:zone:1:zone-a:1"), None, vec![0, 1]),
        ("ME=ssd", Some("1:ME:1:ssd:1"), None, vec![]),
    ];
    assert!(cases.len() >= 30);
    for (readable, tuple, n, want) in cases {
        assert_eq!(ranks(readable, n).unwrap(), want, "readable: {readable}");
        if let Some(t) = tuple {
            assert_eq!(ranks(t, n).unwrap(), want, "tuple: {t} (for {readable})");
            assert_eq!(parse(t).unwrap().spread, parse(readable).unwrap().spread, "spread of {t}");
        }
    }
}

#[test]
fn not_enough_targets_is_an_error() {
    let q = parse("media=ssd").unwrap();
    assert_eq!(select(&q, &targets(), Some(4)), Err(SelectError::NotEnough { found: 3, wanted: 4 }));
}

#[test]
fn errors_point_at_the_offending_tuple_or_column() {
    for (q, needle) in [
        ("1:media:1:ssd", "tuple 1 '1:media:1:ssd': expected 5 fields"),
        ("1:media:1:ssd:1.3:any:3:any:3", "tuple 2 '3:any:3:any:3': AND needs two"),
        ("1:a:1:b:1.5:a:1:b:1", "tuple 2 '5:a:1:b:1': unknown OP 5"),
        ("1:a:9:b:1", "KEY_OP '9'"),
        ("1:a:1:b:x", "VAL_OP 'x'"),
        ("x:a:1:b:1", "OP 'x' is not a number"),
        ("2:any:3:any:3", "NOT needs one"),
        ("1:a:3|64:b:1", "need an exact key"),
        ("1:a:1|32:b:1", "KEY_OP '1|32'"),
        ("media=", "column 7"),
        ("media=ssd and (zone=a", "expected ')'"),
        ("unique(host) or media=ssd", "not used under 'or'"),
        ("not unique(host)", "not used under 'not'"),
        ("media ssd", "expected '=' or '!=' after 'media'"),
        ("media=ssd $", "column 11 near '$': unexpected character"),
        ("media=ssd zone=a", "expected 'and', 'or' or the end"),
        ("unique(h*)", "expected an attribute name"),
        ("(((", "query ends"),
    ] {
        let e = parse(q).expect_err(q).to_string();
        assert!(e.contains(needle), "{q}: {e}");
    }
}

#[test]
fn a_hundred_thousand_random_queries_never_panic() {
    let alphabet: &[u8] = b"0123456789:.|abcdehmnorstuqy=!()* -_/";
    let words = ["and ", "or ", "not ", "unique(", "same(", "media", "=", "1:", ":3", "|64", "|128", ".", "(", ")"];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t = targets();
    for _ in 0..100_000 {
        let len = next() % 40;
        let mut s = String::new();
        for _ in 0..len {
            let r = next();
            if r % 4 == 0 {
                s.push_str(words[(r >> 8) as usize % words.len()]);
            } else {
                s.push(alphabet[(r >> 8) as usize % alphabet.len()] as char);
            }
        }
        if let Ok(q) = parse(&s) {
            let _ = select(&q, &t, Some((next() % 4) as usize));
        }
    }
    // Deep nesting is refused, not a stack overflow.
    assert!(parse(&format!("{}media=ssd{}", "(".repeat(5000), ")".repeat(5000))).is_err());
    assert!(parse(&"not ".repeat(1000)).is_err());
}
