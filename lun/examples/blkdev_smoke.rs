//! Smoke test on a real block device (e.g. a loop device):
//! `cargo run -p nvtarget-lun --example blkdev_smoke -- /dev/loop0` (destroys its contents).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nvtarget_lun::{AggrOptions, Aggregate, FileStorage, Storage};

fn main() {
    let path = std::env::args().nth(1).expect("usage: blkdev_smoke DEVICE");
    for direct in [false, true] {
        let st = FileStorage::open(path.as_ref(), direct).expect("open");
        let size = st.len().expect("len");
        let agg = Aggregate::create(
            st,
            AggrOptions {
                size_bytes: size,
                soft_threshold_pct: 80,
            },
        )
        .expect("create");
        let l = agg.create_lun("a", size / 2).expect("lun");
        agg.write(l, 512, &[7u8; 8192]).expect("write");
        agg.cp(1).expect("cp");
        drop(agg);
        let agg = Aggregate::open(FileStorage::open(path.as_ref(), direct).expect("open"))
            .expect("mount");
        let mut b = vec![0u8; 8192];
        agg.read(l, 512, &mut b).expect("read");
        assert_eq!(b, vec![7u8; 8192]);
        let r = agg.check();
        assert!(r.is_clean(), "{r}");
        println!("{path} ({size} bytes, direct={direct}): ok\n{r}");
    }
}
