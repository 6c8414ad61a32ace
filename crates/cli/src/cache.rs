//! `attest cache`: the cache of ready machines (snapshots saved at a machine's `ready` point and
//! restored by later runs): `list` shows each entry, `clear` removes them, or only the oldest
//! beyond a size.

use attest_machine::snapshot::cache::SnapshotCache;

use crate::exit_code;

#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(clap::Subcommand)]
enum CacheCommand {
    /// Each cached machine: its name, key, size on disk, age and directory, oldest first.
    List,
    /// Remove cached machines: all of them, or the oldest until the rest fit in --max-size.
    Clear {
        /// Keep the newest entries that fit in this size (K, M, G or T: "4G").
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
    },
}

pub fn run(args: CacheArgs) -> i32 {
    let cache = SnapshotCache::new(&attest_image::cache_dir());
    match args.command {
        CacheCommand::List => {
            let entries = cache.list();
            if entries.is_empty() {
                out!("no cached machines in {}", cache.dir().display());
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            for (entry, bytes) in entries {
                let m = &entry.manifest;
                let age = now.saturating_sub(m.created);
                out!("{:<16} {}  {:>9}  {:>8}  {}", m.machine, m.key, size(bytes), ago(age), entry.dir.display());
            }
            0
        }
        CacheCommand::Clear { max_size } => {
            let keep = match max_size.as_deref().map(attest_driver::config::size_mib).transpose() {
                Ok(keep) => keep.map(|mib| mib << 20),
                Err(e) => return exit_code::setup_error(&e),
            };
            let (removed, freed) = cache.clear(keep);
            out!("removed {removed} cached machine(s), {} from {}", size(freed), cache.dir().display());
            0
        }
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}
