//! A small iSCSI initiator: enough to log in, read, write and check data.
//!
//! It exists to test nvtarget from the outside (restart and crash rounds,
//! failover drills) with many commands in flight. It is written separately
//! from the target's own codec on purpose: a bug that is symmetric in one
//! codec cannot hide from an independent peer.
//!
//! One connection, ErrorRecoveryLevel 0, no digests. A reader task routes
//! Data-In, R2T and SCSI Response PDUs to the waiting command by its ITT; a
//! writer task owns the socket's write half. Commands are pipelined: call
//! [`Client::command`] from as many tasks as you want commands in flight.
#![forbid(unsafe_code)]

pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("login failed: status class {class:#04x} detail {detail:#04x}")]
    Login { class: u8, detail: u8 },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("SCSI status {status:#04x} sense key {key:#x} asc/ascq {asc:#04x}/{ascq:#04x}")]
    Scsi {
        status: u8,
        key: u8,
        asc: u8,
        ascq: u8,
    },
}

/// What a command returned.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u8,
    pub sense: Bytes,
    pub data: Bytes,
    pub residual: u32,
}

impl Response {
    /// (sense key, ASC, ASCQ) for fixed or descriptor sense.
    pub fn sense_code(&self) -> (u8, u8, u8) {
        let s = &self.sense;
        match s.first().map(|b| b & 0x7f) {
            Some(0x70) | Some(0x71) if s.len() >= 14 => (s[2] & 0x0f, s[12], s[13]),
            Some(0x72) | Some(0x73) if s.len() >= 4 => (s[1] & 0x0f, s[2], s[3]),
            _ => (0, 0, 0),
        }
    }

    /// Ok when GOOD, the decoded sense otherwise.
    pub fn check(self) -> Result<Response, ClientError> {
        if self.status == 0 {
            return Ok(self);
        }
        let (key, asc, ascq) = self.sense_code();
        Err(ClientError::Scsi {
            status: self.status,
            key,
            asc,
            ascq,
        })
    }
}

/// Login parameters.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    pub initiator: String,
    pub target: String,
    pub isid: u64,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

impl LoginOptions {
    pub fn new(initiator: &str, target: &str) -> Self {
        LoginOptions {
            initiator: initiator.into(),
            target: target.into(),
            isid: 0x8000_0000_0001 | ((std::process::id() as u64 & 0xffff) << 8),
            immediate_data: true,
            initial_r2t: false,
        }
    }
}

/// Parameters the session ended up with.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    /// The target's MaxRecvDataSegmentLength: our Data-Out segment limit.
    target_mrdsl: u32,
    first_burst: u32,
    immediate_data: bool,
    initial_r2t: bool,
}

struct Pending {
    done: oneshot::Sender<Result<Response, ClientError>>,
    data: BytesMut,
    /// Write data, for R2Ts.
    out: Bytes,
    lun: u64,
}

struct Shared {
    pending: Mutex<HashMap<u32, Pending>>,
    tx: mpsc::UnboundedSender<Bytes>,
    neg: Negotiated,
    /// StatSN of the last status seen, plus one.
    exp_statsn: AtomicU32,
    /// The reader ended: set under the `pending` lock, so a command issued
    /// after the connection dropped fails at once instead of waiting for
    /// a completion nobody will deliver (the full command timeout).
    closed: std::sync::atomic::AtomicBool,
}

/// One logged-in session.
pub struct Client {
    shared: Arc<Shared>,
    itt: AtomicU32,
    cmdsn: Mutex<u32>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    pub timeout: Duration,
}

const OP_SCSI_CMD: u8 = 0x01;
const OP_DATA_OUT: u8 = 0x05;
const OP_LOGIN: u8 = 0x03;
const OP_LOGOUT: u8 = 0x06;
const OP_NOP_IN: u8 = 0x20;
const OP_SCSI_RSP: u8 = 0x21;
const OP_LOGIN_RSP: u8 = 0x23;
const OP_DATA_IN: u8 = 0x25;
const OP_LOGOUT_RSP: u8 = 0x26;
const OP_R2T: u8 = 0x31;
const OP_ASYNC: u8 = 0x32;
const OP_REJECT: u8 = 0x3f;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn dlen(bhs: &[u8]) -> usize {
    ((bhs[5] as usize) << 16) | ((bhs[6] as usize) << 8) | bhs[7] as usize
}

/// SAM LUN encoding for LUNs below 16384 (peripheral / flat addressing).
fn lun_bytes(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        b[1] = lun as u8;
    }
    b
}

fn pdu(bhs: [u8; 48], data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(48 + data.len() + 3);
    let mut bhs = bhs;
    let n = data.len();
    bhs[5] = (n >> 16) as u8;
    bhs[6] = (n >> 8) as u8;
    bhs[7] = n as u8;
    b.put_slice(&bhs);
    b.put_slice(data);
    b.put_bytes(0, (4 - n % 4) % 4);
    b.freeze()
}

async fn read_pdu(r: &mut (impl AsyncReadExt + Unpin)) -> Result<([u8; 48], Bytes), ClientError> {
    let mut bhs = [0u8; 48];
    r.read_exact(&mut bhs).await?;
    let ahs = bhs[4] as usize * 4;
    let n = dlen(&bhs);
    if n > 16 << 20 {
        return Err(ClientError::Protocol(format!("data segment of {n} bytes")));
    }
    let mut body = vec![0u8; ahs + n + (4 - n % 4) % 4];
    r.read_exact(&mut body).await?;
    let data = Bytes::from(body).slice(ahs..ahs + n);
    Ok((bhs, data))
}

fn keys(data: &[u8]) -> HashMap<String, String> {
    data.split(|&b| b == 0)
        .filter_map(|kv| {
            let s = std::str::from_utf8(kv).ok()?;
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

impl Client {
    /// Connects to `addr` ("127.0.0.1:3260") and logs in (no authentication).
    pub async fn connect(addr: &str, opts: &LoginOptions) -> Result<Client, ClientError> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let isid = opts.isid.to_be_bytes();
        let mut cmdsn = 1u32;
        let login = |csg: u8, nsg: u8, text: String, cmdsn: u32| {
            let mut h = [0u8; 48];
            h[0] = 0x40 | OP_LOGIN;
            h[1] = 0x80 | (csg << 2) | nsg;
            h[8..14].copy_from_slice(&isid[2..8]);
            h[16..20].copy_from_slice(&0u32.to_be_bytes());
            h[24..28].copy_from_slice(&cmdsn.to_be_bytes());
            pdu(h, text.as_bytes())
        };
        let sec = format!(
            "InitiatorName={}\0TargetName={}\0SessionType=Normal\0AuthMethod=None\0",
            opts.initiator, opts.target
        );
        sock.write_all(&login(0, 1, sec, cmdsn)).await?;
        let (h, _) = read_pdu(&mut sock).await?;
        check_login(&h)?;
        let ops = format!(
            "HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=262144\0\
             ImmediateData={}\0InitialR2T={}\0FirstBurstLength=262144\0MaxBurstLength=1048576\0\
             MaxOutstandingR2T=1\0MaxConnections=1\0ErrorRecoveryLevel=0\0DefaultTime2Wait=2\0\
             DefaultTime2Retain=0\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0",
            if opts.immediate_data { "Yes" } else { "No" },
            if opts.initial_r2t { "Yes" } else { "No" },
        );
        sock.write_all(&login(1, 3, ops, cmdsn)).await?;
        let (h, data) = read_pdu(&mut sock).await?;
        check_login(&h)?;
        if h[1] & 0x80 == 0 || h[1] & 0x03 != 3 {
            return Err(ClientError::Protocol(
                "target did not move to full feature phase".into(),
            ));
        }
        let k = keys(&data);
        let num = |key: &str, def: u32| k.get(key).and_then(|v| v.parse().ok()).unwrap_or(def);
        let yes = |key: &str, def: bool| k.get(key).map(|v| v == "Yes").unwrap_or(def);
        let neg = Negotiated {
            target_mrdsl: num("MaxRecvDataSegmentLength", 8192).max(512),
            first_burst: num("FirstBurstLength", 65536),
            immediate_data: yes("ImmediateData", true),
            initial_r2t: yes("InitialR2T", true),
        };
        // ExpCmdSN of the final Login Response: the first command's CmdSN.
        cmdsn = be32(&h, 28);
        let (rd, mut wr) = sock.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            tx,
            neg,
            exp_statsn: AtomicU32::new(be32(&h, 24).wrapping_add(1)),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let writer = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let sh = shared.clone();
        let reader = tokio::spawn(async move {
            let mut rd = tokio::io::BufReader::with_capacity(1 << 20, rd);
            let err = loop {
                match read_pdu(&mut rd).await {
                    Ok((h, d)) => {
                        if let Err(e) = handle_incoming(&sh, &h, d) {
                            break e;
                        }
                    }
                    Err(e) => break e,
                }
            };
            let _ = err;
            let mut pending = sh.pending.lock();
            sh.closed.store(true, Ordering::Release);
            for (_, p) in pending.drain() {
                let _ = p.done.send(Err(ClientError::Closed));
            }
        });
        Ok(Client {
            shared,
            itt: AtomicU32::new(1),
            cmdsn: Mutex::new(cmdsn),
            reader,
            writer,
            timeout: Duration::from_secs(30),
        })
    }

    /// Sends one SCSI command; `data_out` is the write data (empty for
    /// reads), `in_len` the expected Data-In length.
    pub async fn command(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        in_len: u32,
    ) -> Result<Response, ClientError> {
        if cdb.len() > 16 {
            return Err(ClientError::Protocol(
                "CDBs over 16 bytes need an AHS".into(),
            ));
        }
        let itt = self.itt.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        let neg = self.shared.neg;
        let (done, rx) = oneshot::channel();
        let edtl = if data_out.is_empty() {
            in_len
        } else {
            data_out.len() as u32
        };
        let mut h = [0u8; 48];
        h[0] = OP_SCSI_CMD;
        h[1] = 0x80 | 0x01; // F, SIMPLE
        if !data_out.is_empty() {
            h[1] |= 0x20;
        }
        if in_len > 0 {
            h[1] |= 0x40;
        }
        h[8..16].copy_from_slice(&lun_bytes(lun));
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&edtl.to_be_bytes());
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        // Immediate data, then unsolicited Data-Out up to FirstBurstLength.
        let first = if data_out.is_empty() {
            0
        } else {
            let burst = if neg.initial_r2t {
                0
            } else {
                neg.first_burst as usize
            };
            let imm = if neg.immediate_data {
                (neg.target_mrdsl as usize).min(neg.first_burst as usize)
            } else {
                0
            };
            imm.max(burst).min(data_out.len())
        };
        let imm = if neg.immediate_data {
            first.min(neg.target_mrdsl as usize)
        } else {
            0
        };
        {
            let mut pending = self.shared.pending.lock();
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed);
            }
            pending.insert(
                itt,
                Pending {
                    done,
                    data: BytesMut::new(),
                    out: data_out.clone(),
                    lun,
                },
            );
        }
        {
            // CmdSN order on the wire must match CmdSN order of assignment.
            let mut sn = self.cmdsn.lock();
            h[24..28].copy_from_slice(&sn.to_be_bytes());
            h[28..32]
                .copy_from_slice(&self.shared.exp_statsn.load(Ordering::Relaxed).to_be_bytes());
            *sn = sn.wrapping_add(1);
            self.send(pdu(h, &data_out[..imm]))?;
            if first > imm {
                send_data_out(
                    &self.shared,
                    lun,
                    itt,
                    0xffff_ffff,
                    &data_out,
                    imm,
                    first - imm,
                    0,
                )?;
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.shared.pending.lock().remove(&itt);
                Err(ClientError::Timeout)
            }
        }
    }

    fn send(&self, b: Bytes) -> Result<(), ClientError> {
        self.shared.tx.send(b).map_err(|_| ClientError::Closed)
    }

    pub async fn read16(
        &self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<Bytes, ClientError> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        Ok(self
            .command(lun, &cdb, Bytes::new(), blocks * block_size)
            .await?
            .check()?
            .data)
    }

    pub async fn write16(
        &self,
        lun: u64,
        lba: u64,
        data: Bytes,
        block_size: u32,
        fua: bool,
    ) -> Result<(), ClientError> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        if fua {
            cdb[1] = 0x08;
        }
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&((data.len() as u32) / block_size).to_be_bytes());
        self.command(lun, &cdb, data, 0).await?.check()?;
        Ok(())
    }

    /// SYNCHRONIZE CACHE(16) over the whole LUN.
    pub async fn sync_cache(&self, lun: u64) -> Result<(), ClientError> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x91;
        self.command(lun, &cdb, Bytes::new(), 0).await?.check()?;
        Ok(())
    }

    /// (block count, block size) from READ CAPACITY(16).
    pub async fn capacity(&self, lun: u64) -> Result<(u64, u32), ClientError> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let d = self
            .command(lun, &cdb, Bytes::new(), 32)
            .await?
            .check()?
            .data;
        if d.len() < 12 {
            return Err(ClientError::Protocol("short READ CAPACITY(16) data".into()));
        }
        let last = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        Ok((last + 1, be32(&d, 8)))
    }

    /// TEST UNIT READY until it is GOOD, consuming unit attentions.
    pub async fn clear_unit_attentions(&self, lun: u64) -> Result<(), ClientError> {
        for _ in 0..8 {
            if self.command(lun, &[0u8; 6], Bytes::new(), 0).await?.status == 0 {
                return Ok(());
            }
        }
        Err(ClientError::Protocol(
            "unit attentions did not clear".into(),
        ))
    }

    /// Logs out and closes the connection.
    pub async fn logout(self) -> Result<(), ClientError> {
        let mut h = [0u8; 48];
        h[0] = 0x40 | OP_LOGOUT;
        h[1] = 0x80;
        h[16..20].copy_from_slice(&0x7fff_fff0u32.to_be_bytes());
        let sn = *self.cmdsn.lock();
        h[24..28].copy_from_slice(&sn.to_be_bytes());
        let _ = self.send(pdu(h, &[]));
        // The reader ends when the target closes after its Logout Response.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.reader.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

fn check_login(h: &[u8; 48]) -> Result<(), ClientError> {
    if h[0] & 0x3f != OP_LOGIN_RSP {
        return Err(ClientError::Protocol(format!(
            "expected a Login Response, got opcode {:#04x}",
            h[0]
        )));
    }
    if h[36] != 0 {
        return Err(ClientError::Login {
            class: h[36],
            detail: h[37],
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn send_data_out(
    sh: &Shared,
    lun: u64,
    itt: u32,
    ttt: u32,
    data: &[u8],
    offset: usize,
    len: usize,
    first_datasn: u32,
) -> Result<(), ClientError> {
    let seg = sh.neg.target_mrdsl as usize;
    let mut done = 0;
    let mut datasn = first_datasn;
    while done < len {
        let n = (len - done).min(seg);
        let mut h = [0u8; 48];
        h[0] = OP_DATA_OUT;
        if done + n == len {
            h[1] = 0x80;
        }
        h[8..16].copy_from_slice(&lun_bytes(lun));
        h[16..20].copy_from_slice(&itt.to_be_bytes());
        h[20..24].copy_from_slice(&ttt.to_be_bytes());
        h[28..32].copy_from_slice(&sh.exp_statsn.load(Ordering::Relaxed).to_be_bytes());
        h[36..40].copy_from_slice(&datasn.to_be_bytes());
        h[40..44].copy_from_slice(&((offset + done) as u32).to_be_bytes());
        let at = offset + done;
        sh.tx
            .send(pdu(h, &data[at..at + n]))
            .map_err(|_| ClientError::Closed)?;
        done += n;
        datasn += 1;
    }
    Ok(())
}

fn handle_incoming(sh: &Shared, h: &[u8; 48], data: Bytes) -> Result<(), ClientError> {
    let op = h[0] & 0x3f;
    let itt = be32(h, 16);
    let carries_status =
        op == OP_SCSI_RSP || op == OP_NOP_IN || (op == OP_DATA_IN && h[1] & 0x01 != 0);
    if carries_status {
        sh.exp_statsn
            .fetch_max(be32(h, 24).wrapping_add(1), Ordering::Relaxed);
    }
    match op {
        OP_DATA_IN => {
            let mut p = sh.pending.lock();
            let Some(cmd) = p.get_mut(&itt) else {
                return Ok(());
            };
            let off = be32(h, 40) as usize;
            if off + data.len() > 64 << 20 {
                return Err(ClientError::Protocol("Data-In offset out of range".into()));
            }
            if cmd.data.len() < off + data.len() {
                cmd.data.resize(off + data.len(), 0);
            }
            cmd.data[off..off + data.len()].copy_from_slice(&data);
            if h[1] & 0x01 != 0 {
                // Status collapsed into the last Data-In.
                let cmd = p.remove(&itt).ok_or(ClientError::Closed)?;
                let _ = cmd.done.send(Ok(Response {
                    status: h[3],
                    sense: Bytes::new(),
                    data: cmd.data.freeze(),
                    residual: be32(h, 44),
                }));
            }
        }
        OP_SCSI_RSP => {
            let Some(cmd) = sh.pending.lock().remove(&itt) else {
                return Ok(());
            };
            let sense = if data.len() >= 2 {
                let n = u16::from_be_bytes([data[0], data[1]]) as usize;
                data.slice(2..(2 + n).min(data.len()))
            } else {
                Bytes::new()
            };
            let _ = cmd.done.send(Ok(Response {
                status: h[3],
                sense,
                data: cmd.data.freeze(),
                residual: be32(h, 44),
            }));
        }
        OP_R2T => {
            let (lun, out) = match sh.pending.lock().get(&itt) {
                Some(c) => (c.lun, c.out.clone()),
                None => return Ok(()),
            };
            let ttt = be32(h, 20);
            let off = be32(h, 40) as usize;
            let len = be32(h, 44) as usize;
            if off + len > out.len() {
                return Err(ClientError::Protocol("R2T beyond the write data".into()));
            }
            send_data_out(sh, lun, itt, ttt, &out, off, len, 0)?;
        }
        OP_NOP_IN => {
            let ttt = be32(h, 20);
            if ttt != 0xffff_ffff {
                // A ping from the target: answer with a NOP-Out echoing TTT.
                let mut o = [0u8; 48];
                o[0] = 0x40;
                o[1] = 0x80;
                o[8..16].copy_from_slice(&h[8..16]);
                o[16..20].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
                o[20..24].copy_from_slice(&ttt.to_be_bytes());
                sh.tx.send(pdu(o, &data)).map_err(|_| ClientError::Closed)?;
            }
        }
        OP_LOGOUT_RSP => return Err(ClientError::Closed),
        OP_ASYNC => {}
        OP_REJECT => {
            return Err(ClientError::Protocol(format!(
                "target rejected a PDU, reason {:#04x}",
                h[2]
            )))
        }
        other => {
            return Err(ClientError::Protocol(format!(
                "unexpected opcode {other:#04x}"
            )));
        }
    }
    Ok(())
}
