//! CDB decoder: any bytes either fail the length check or decode; a decoded
//! READ/WRITE-family CDB re-encodes to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvtarget_scsi::cdb::{Cdb, RwCdb};

fuzz_target!(|data: &[u8]| {
    let Ok(cdb) = Cdb::new(data) else { return };
    assert!(cdb.len() <= data.len());
    let rw = RwCdb::parse(&cdb);
    let bytes = rw.encode();
    let again = Cdb::new(&bytes).expect("encoded CDB has its group's length");
    let back = RwCdb::parse(&again);
    if cdb.len() == 6 {
        // 6-byte CDBs carry no flags and a 21-bit LBA.
        assert_eq!((back.lba, back.blocks), (rw.lba & 0x1f_ffff, rw.blocks));
    } else {
        assert_eq!(back, rw);
    }
});
