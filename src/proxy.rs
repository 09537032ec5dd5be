//! Forwarded SCSI commands: how the partner node answers for the owner's LUNs.
//!
//! In a pair each node also presents its partner's LUNs (ALUA
//! active/non-optimized). A command the partner cannot answer from its copy
//! of the owner's log is sent here, over the interconnect, to the owner,
//! which runs it against its real [`ScsiTarget`] with the ORIGINAL
//! initiator's I_T nexus: persistent reservations, unit attentions and ALUA
//! then see that initiator coming in through the partner's relative port,
//! exactly as if it had logged in to the owner.
//!
//! Partner side: [`ProxyClient`] keeps one pipelined connection to the
//! owner's interconnect address, opened on first use and again on the next
//! call after a failure. Owner side: the interconnect listener recognises
//! the preface and hands the stream to [`serve_connection`].
//!
//! Wire format. The partner opens the connection with the 4 bytes
//! [`PREFACE`] (once), then both ends send frames: a 16-byte header and a
//! body. Integers are big-endian; every variable part has an explicit length
//! and `body_len` must equal the sum exactly.
//!
//! ```text
//! header
//! offset size field
//!      0    4 magic      b"NVPF"
//!      4    1 type       open enum `FrameType`: 1 REQUEST (partner -> owner),
//!                        2 RESPONSE, 3 ERROR (owner -> partner)
//!      5    3 reserved   0
//!      8    4 tag        chosen by the partner; the answer carries its request's tag
//!     12    4 body_len   bytes after the header, <= MAX_BODY (32 MiB + 4 KiB)
//!     16    … body
//!
//! REQUEST body: 36 fixed bytes, then the variable parts back to back
//!      0    8 lun
//!      8    4 expected_in_len  Data-In the initiator can take
//!     12    1 attr             0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA
//!     13    1 tmf              0: run the CDB; else a task management
//!                                 function (`TMF_*`) for `lun` and the
//!                                 nexus, the CDB empty; the RESPONSE's
//!                                 status is then the `TMF_RESULT_*`
//!     14    2 cdb_len          C <= 260
//!     16    2 relative_port    of the partner port the command came in on
//!     18    2 tpgt
//!     20    8 isid
//!     28    1 target_len       T
//!     29    1 port_len         P  initiator port name ("<name>,i,0x<isid>")
//!     30    1 name_len         N  initiator name
//!     31    1 reserved
//!     32    4 data_out_len     D
//!     36    T target name (UTF-8), C cdb, P initiator port (UTF-8),
//!           N initiator name (UTF-8), D Data-Out
//!
//! RESPONSE body: 8 fixed bytes, then
//!      0    1 status
//!      1    1 reserved
//!      2    2 sense_len        S
//!      4    4 data_len         D  all the Data-In the target produced (the
//!                                 partner's transport truncates it to what the
//!                                 initiator expects and reports the residual)
//!      8    S sense, D Data-In
//!
//! ERROR body: 8 bytes, the command was not run (or its answer does not fit)
//!      0    4 code             open enum `ErrorCode`
//!      4    4 reserved
//! ```
//!
//! Invariants:
//! - The decoder checks the header once (magic, type, reserved, `body_len`
//!   against the limit) before buffering the body, then reads the body
//!   through a bounded reader. Any input gives a frame, "need more bytes"
//!   or an error, never a panic; an accepted frame re-encodes to the same
//!   bytes. Anything it refuses closes the connection, logged once with the
//!   peer's address.
//! - Every `execute` ends: with the owner's answer, with an ERROR frame's
//!   error, or with `ConnectionLost`/`Protocol` once the connection goes
//!   (whichever task notices first fails every waiter). It never hangs on a
//!   dead connection, and it is cancel-safe (dropping it forgets the tag).
//! - The owner holds at most [`MAX_IN_FLIGHT`] requests per connection
//!   between reading one and writing its answer; when full it stops
//!   reading, so a partner that does not collect its answers is throttled
//!   by TCP, not by the owner's memory.
#![allow(dead_code)] // the codec's encode side and to_vec serve the tests and a fuzz target to come

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use nvtarget_scsi::{ItNexus, ScsiCommand, ScsiResponse, ScsiTarget, TaskAttr};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

/// First bytes the partner sends on a forwarded-command connection; the
/// interconnect listener dispatches on them.
pub const PREFACE: [u8; 4] = *b"NVPX";
/// Magic of every frame header.
pub const MAGIC: [u8; 4] = *b"NVPF";
pub const HEADER_LEN: usize = 16;
const TYPE_OFF: usize = 4;
const TAG_OFF: usize = 8;
const LEN_OFF: usize = 12;
/// Largest body: the largest transfer a LUN advertises (MAXIMUM TRANSFER
/// LENGTH in the Block Limits VPD page, 32 MiB) plus everything around it,
/// so no command the initiator may send is too large to forward.
pub const MAX_BODY: usize = (32 << 20) + 4096;
pub const MAX_CDB: usize = 260;
/// Strings carry a one-byte length.
pub const MAX_STRING: usize = u8::MAX as usize;
pub const REQUEST_FIXED_LEN: usize = 36;
pub const RESPONSE_FIXED_LEN: usize = 8;
pub const ERROR_LEN: usize = 8;
/// Requests the owner runs at once per connection.
pub const MAX_IN_FLIGHT: usize = 256;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reads ask for at least this much room, so small frames cost few syscalls.
const READ_CHUNK: usize = 64 << 10;
const WRITE_BUFFER: usize = 64 << 10;

macro_rules! open_enum {
    ($(#[$tm:meta])* $name:ident($repr:ty) { $($(#[$m:meta])* $c:ident = $v:expr,)* }) => {
        $(#[$tm])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $repr);
        impl $name {
            $($(#[$m])* pub const $c: $name = $name($v);)*
            /// The constant's name, if this value has one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($v => Some(stringify!($c)),)*
                    _ => None,
                }
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, concat!(stringify!($name), "(0x{:x})"), self.0),
                }
            }
        }
    };
}

open_enum! {
    /// Frame type.
    FrameType(u8) {
        REQUEST = 1,
        RESPONSE = 2,
        ERROR = 3,
    }
}

open_enum! {
    /// Why the owner answers a request with an ERROR frame.
    ErrorCode(u32) {
        /// The owner serves no target of that name.
        UNKNOWN_TARGET = 1,
        /// The target's answer is larger than a frame may be.
        RESPONSE_TOO_LARGE = 2,
        /// The command panicked on the owner.
        EXECUTION_FAILED = 3,
    }
}

/// The initiator's I_T nexus as the partner saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedNexus {
    pub initiator_port: String,
    pub initiator_name: String,
    pub isid: u64,
    /// The partner's relative target port.
    pub relative_port: u16,
    pub tpgt: u16,
}

impl From<&ItNexus> for ForwardedNexus {
    fn from(n: &ItNexus) -> Self {
        Self {
            initiator_port: n.initiator_port.clone(),
            initiator_name: n.initiator_name.clone(),
            isid: n.isid,
            relative_port: n.relative_port,
            tpgt: n.tpgt,
        }
    }
}

impl From<ItNexus> for ForwardedNexus {
    fn from(n: ItNexus) -> Self {
        Self {
            initiator_port: n.initiator_port,
            initiator_name: n.initiator_name,
            isid: n.isid,
            relative_port: n.relative_port,
            tpgt: n.tpgt,
        }
    }
}

impl From<ForwardedNexus> for ItNexus {
    fn from(n: ForwardedNexus) -> Self {
        Self {
            initiator_port: n.initiator_port,
            initiator_name: n.initiator_name,
            isid: n.isid,
            relative_port: n.relative_port,
            tpgt: n.tpgt,
        }
    }
}

/// One command for the owner, with all of its Data-Out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    /// The owner's iSCSI target name.
    pub target: String,
    /// 0, or a task management function to run instead of the CDB.
    pub tmf: u8,
    pub lun: u64,
    pub cdb: Bytes,
    pub attr: TaskAttr,
    pub data_out: Bytes,
    pub expected_in_len: u32,
    pub nexus: ForwardedNexus,
}

/// The owner's answer, as [`ScsiResponse`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProxyResponse {
    pub status: u8,
    pub sense: Bytes,
    pub data: Bytes,
}

impl From<ScsiResponse> for ProxyResponse {
    fn from(r: ScsiResponse) -> Self {
        Self {
            status: r.status,
            sense: Bytes::from(r.sense),
            data: Bytes::from(r.data),
        }
    }
}

/// Why a frame (or the stream carrying it) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad preface {0:02x?}")]
    BadPreface([u8; 4]),
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unknown frame type {0:?}")]
    UnknownType(FrameType),
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameType),
    #[error("reserved bits set in {0}")]
    Reserved(&'static str),
    #[error("{what} of {len} bytes exceeds {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("body ends inside {0}")]
    Truncated(&'static str),
    #[error("{0} bytes after the last field")]
    Trailing(usize),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown task attribute {0}")]
    BadAttr(u8),
    #[error("connection closed inside a frame")]
    EndInsideFrame,
}

/// What [`ProxyClient::execute`] can fail with; the caller turns each into a
/// SCSI error for the initiator.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot connect to the owner at {owner}: {source}")]
    Connect {
        owner: SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("connection to the owner lost")]
    ConnectionLost,
    #[error("the owner has no target {0:?}")]
    UnknownTarget(String),
    #[error("the owner refused the command: {0:?}")]
    Owner(ErrorCode),
    #[error("command cannot be forwarded: {0}")]
    Request(FrameError),
    #[error("owner broke the protocol: {0}")]
    Protocol(FrameError),
}

/// Finds the owner's target by iSCSI name. Called on the connection's
/// reader task, so it must not block (a map lookup).
pub type Resolver = Arc<dyn Fn(&str) -> Option<Arc<ScsiTarget>> + Send + Sync>;

// ---------------------------------------------------------------- codec

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Request { tag: u32, req: ProxyRequest },
    Response { tag: u32, resp: ProxyResponse },
    Error { tag: u32, code: ErrorCode },
}

/// An encoded frame in two parts, so the bulk data (Data-Out, Data-In) is
/// written from the caller's buffer instead of being copied.
#[derive(Debug)]
pub struct WireFrame {
    head: Bytes,
    tail: Bytes,
}

impl WireFrame {
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.head[..], &self.tail[..]].concat()
    }
}

fn attr_code(a: TaskAttr) -> u8 {
    match a {
        TaskAttr::Untagged => 0,
        TaskAttr::Simple => 1,
        TaskAttr::Ordered => 2,
        TaskAttr::HeadOfQueue => 3,
        TaskAttr::Aca => 4,
    }
}

fn attr_of(code: u8) -> Option<TaskAttr> {
    Some(match code {
        0 => TaskAttr::Untagged,
        1 => TaskAttr::Simple,
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => return None,
    })
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), FrameError> {
    if len > max {
        return Err(FrameError::TooLong { what, len, max });
    }
    Ok(())
}

/// The body length of `req`, or why it cannot be sent.
pub fn request_body_len(req: &ProxyRequest) -> Result<usize, FrameError> {
    check_len("target name", req.target.len(), MAX_STRING)?;
    check_len("CDB", req.cdb.len(), MAX_CDB)?;
    check_len("initiator port", req.nexus.initiator_port.len(), MAX_STRING)?;
    check_len("initiator name", req.nexus.initiator_name.len(), MAX_STRING)?;
    check_len("Data-Out", req.data_out.len(), MAX_BODY)?;
    let len = REQUEST_FIXED_LEN
        + req.target.len()
        + req.cdb.len()
        + req.nexus.initiator_port.len()
        + req.nexus.initiator_name.len()
        + req.data_out.len();
    check_len("request", len, MAX_BODY)?;
    Ok(len)
}

fn put_header(b: &mut BytesMut, ty: FrameType, tag: u32, body_len: usize) {
    b.put_slice(&MAGIC);
    b.put_u8(ty.0);
    b.put_slice(&[0; 3]);
    b.put_u32(tag);
    // Callers have checked body_len <= MAX_BODY.
    b.put_u32(body_len as u32);
}

fn encode_request(tag: u32, req: &ProxyRequest) -> Result<WireFrame, FrameError> {
    let body_len = request_body_len(req)?;
    let n = &req.nexus;
    let mut b = BytesMut::with_capacity(HEADER_LEN + body_len - req.data_out.len());
    put_header(&mut b, FrameType::REQUEST, tag, body_len);
    b.put_u64(req.lun);
    b.put_u32(req.expected_in_len);
    b.put_u8(attr_code(req.attr));
    b.put_u8(req.tmf);
    b.put_u16(req.cdb.len() as u16);
    b.put_u16(n.relative_port);
    b.put_u16(n.tpgt);
    b.put_u64(n.isid);
    b.put_u8(req.target.len() as u8);
    b.put_u8(n.initiator_port.len() as u8);
    b.put_u8(n.initiator_name.len() as u8);
    b.put_u8(0);
    b.put_u32(req.data_out.len() as u32);
    b.put_slice(req.target.as_bytes());
    b.put_slice(&req.cdb);
    b.put_slice(n.initiator_port.as_bytes());
    b.put_slice(n.initiator_name.as_bytes());
    Ok(WireFrame {
        head: b.freeze(),
        tail: req.data_out.clone(),
    })
}

fn encode_response(tag: u32, resp: &ProxyResponse) -> Result<WireFrame, FrameError> {
    check_len("sense", resp.sense.len(), u16::MAX as usize)?;
    check_len("Data-In", resp.data.len(), MAX_BODY)?;
    let body_len = RESPONSE_FIXED_LEN + resp.sense.len() + resp.data.len();
    check_len("response", body_len, MAX_BODY)?;
    let mut b = BytesMut::with_capacity(HEADER_LEN + RESPONSE_FIXED_LEN + resp.sense.len());
    put_header(&mut b, FrameType::RESPONSE, tag, body_len);
    b.put_u8(resp.status);
    b.put_u8(0);
    b.put_u16(resp.sense.len() as u16);
    b.put_u32(resp.data.len() as u32);
    b.put_slice(&resp.sense);
    Ok(WireFrame {
        head: b.freeze(),
        tail: resp.data.clone(),
    })
}

fn encode_error(tag: u32, code: ErrorCode) -> WireFrame {
    let mut b = BytesMut::with_capacity(HEADER_LEN + ERROR_LEN);
    put_header(&mut b, FrameType::ERROR, tag, ERROR_LEN);
    b.put_u32(code.0);
    b.put_u32(0);
    WireFrame {
        head: b.freeze(),
        tail: Bytes::new(),
    }
}

impl Frame {
    pub fn tag(&self) -> u32 {
        match self {
            Frame::Request { tag, .. } | Frame::Response { tag, .. } | Frame::Error { tag, .. } => {
                *tag
            }
        }
    }

    pub fn encode(&self) -> Result<WireFrame, FrameError> {
        match self {
            Frame::Request { tag, req } => encode_request(*tag, req),
            Frame::Response { tag, resp } => encode_response(*tag, resp),
            Frame::Error { tag, code } => Ok(encode_error(*tag, *code)),
        }
    }
}

/// Reads fields off a body without ever going past its end.
struct Reader {
    body: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.body.len())
            .ok_or(FrameError::Truncated(what))?;
        let b = self.body.slice(self.pos..end);
        self.pos = end;
        Ok(b)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let b = self.take(N, what)?;
        <[u8; N]>::try_from(&b[..]).map_err(|_| FrameError::Truncated(what))
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.array(what).map(u16::from_be_bytes)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.array(what).map(u32::from_be_bytes)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        self.array(what).map(u64::from_be_bytes)
    }
    fn zero(&mut self, n: usize, what: &'static str) -> Result<(), FrameError> {
        if self.take(n, what)?.iter().any(|&b| b != 0) {
            return Err(FrameError::Reserved(what));
        }
        Ok(())
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, FrameError> {
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::NotUtf8(what))
    }
    fn finish(self) -> Result<(), FrameError> {
        match self.body.len() - self.pos {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}

struct Header {
    ty: FrameType,
    tag: u32,
    body_len: usize,
}

fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let be32 = |off: usize| u32::from_be_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]]);
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let ty = FrameType(h[TYPE_OFF]);
    if ty.name().is_none() {
        return Err(FrameError::UnknownType(ty));
    }
    if h[TYPE_OFF + 1..TAG_OFF].iter().any(|&b| b != 0) {
        return Err(FrameError::Reserved("header"));
    }
    let body_len = be32(LEN_OFF) as usize;
    check_len("body", body_len, MAX_BODY)?;
    Ok(Header {
        ty,
        tag: be32(TAG_OFF),
        body_len,
    })
}

fn decode_request(body: Bytes) -> Result<ProxyRequest, FrameError> {
    let mut r = Reader { body, pos: 0 };
    let lun = r.u64("lun")?;
    let expected_in_len = r.u32("expected_in_len")?;
    let code = r.u8("attr")?;
    let attr = attr_of(code).ok_or(FrameError::BadAttr(code))?;
    let tmf = r.u8("tmf")?;
    let cdb_len = r.u16("cdb_len")? as usize;
    check_len("CDB", cdb_len, MAX_CDB)?;
    let relative_port = r.u16("relative_port")?;
    let tpgt = r.u16("tpgt")?;
    let isid = r.u64("isid")?;
    let target_len = r.u8("target_len")? as usize;
    let port_len = r.u8("port_len")? as usize;
    let name_len = r.u8("name_len")? as usize;
    r.zero(1, "request")?;
    let data_len = r.u32("data_out_len")? as usize;
    let target = r.string(target_len, "target name")?;
    let cdb = r.take(cdb_len, "CDB")?;
    let initiator_port = r.string(port_len, "initiator port")?;
    let initiator_name = r.string(name_len, "initiator name")?;
    let data_out = r.take(data_len, "Data-Out")?;
    r.finish()?;
    Ok(ProxyRequest {
        tmf,
        target,
        lun,
        cdb,
        attr,
        data_out,
        expected_in_len,
        nexus: ForwardedNexus {
            initiator_port,
            initiator_name,
            isid,
            relative_port,
            tpgt,
        },
    })
}

fn decode_response(body: Bytes) -> Result<ProxyResponse, FrameError> {
    let mut r = Reader { body, pos: 0 };
    let status = r.u8("status")?;
    r.zero(1, "response")?;
    let sense_len = r.u16("sense_len")? as usize;
    let data_len = r.u32("data_len")? as usize;
    let sense = r.take(sense_len, "sense")?;
    let data = r.take(data_len, "Data-In")?;
    r.finish()?;
    Ok(ProxyResponse {
        status,
        sense,
        data,
    })
}

fn decode_error(body: Bytes) -> Result<ErrorCode, FrameError> {
    let mut r = Reader { body, pos: 0 };
    let code = ErrorCode(r.u32("code")?);
    r.zero(4, "error")?;
    r.finish()?;
    Ok(code)
}

/// Takes one frame off the front of `buf`: `Ok(None)` until all of it is
/// there (reserving room for the rest once the header says how much).
/// The header is checked as soon as it is complete, so an oversized or
/// garbage frame is refused before its body is buffered.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    // The length is checked once here; the header is a fixed-size view.
    let Some(Ok(h)) = buf.get(..HEADER_LEN).map(<&[u8; HEADER_LEN]>::try_from) else {
        return Ok(None);
    };
    let h = decode_header(h)?;
    let total = HEADER_LEN + h.body_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let body = frame.split_off(HEADER_LEN);
    let tag = h.tag;
    Ok(Some(match h.ty {
        FrameType::REQUEST => Frame::Request {
            tag,
            req: decode_request(body)?,
        },
        FrameType::RESPONSE => Frame::Response {
            tag,
            resp: decode_response(body)?,
        },
        FrameType::ERROR => Frame::Error {
            tag,
            code: decode_error(body)?,
        },
        other => return Err(FrameError::UnknownType(other)),
    }))
}

// ---------------------------------------------------------------- driver

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
}

/// The next frame from `rd`, `Ok(None)` at a clean end of stream.
/// Cancel-safe: partial input stays in `buf`.
async fn read_frame(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<Option<Frame>, Closed> {
    loop {
        if let Some(f) = decode_frame(buf)? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        if rd.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(FrameError::EndInsideFrame.into());
        }
    }
}

/// Writes queued frames in order, batching whatever is queued into one
/// flush; `T` (the owner's in-flight slot) is released once its frame is
/// handed to the socket.
async fn write_frames<T>(
    wr: OwnedWriteHalf,
    preface: Option<[u8; 4]>,
    mut rx: mpsc::UnboundedReceiver<(WireFrame, T)>,
) -> io::Result<()> {
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER, wr);
    if let Some(p) = preface {
        wr.write_all(&p).await?;
    }
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some((f, slot)) = next.take() {
            wr.write_all(&f.head).await?;
            wr.write_all(&f.tail).await?;
            drop(slot);
            next = rx.try_recv().ok();
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

/// Owner side: serves one forwarded-command connection until the partner
/// closes it or breaks the protocol. The stream starts with [`PREFACE`],
/// still unread when handed over.
pub async fn serve_connection(stream: TcpStream, resolve: Resolver) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "proxy connection gone before it was served");
            return;
        }
    };
    match serve(stream, resolve).await {
        Ok(()) => tracing::debug!(%peer, "proxy connection closed"),
        Err(e) => tracing::warn!(%peer, error = %e, "proxy connection closed"),
    }
}

async fn serve(stream: TcpStream, resolve: Resolver) -> Result<(), Closed> {
    // Answers are small and latency-bound.
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    let mut preface = [0u8; 4];
    rd.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Err(FrameError::BadPreface(preface).into());
    }
    let (tx, rx) = mpsc::unbounded_channel::<(WireFrame, OwnedSemaphorePermit)>();
    let writer = tokio::spawn(write_frames(wr, None, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = BytesMut::new();
    let ended = loop {
        // A slot first: when all are taken, stop reading.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        let frame = tokio::select! {
            f = read_frame(&mut rd, &mut buf) => f,
            // The writer failed; its error is reported below.
            () = tx.closed() => break Ok(()),
        };
        let (tag, req) = match frame {
            Ok(Some(Frame::Request { tag, req })) => (tag, req),
            Ok(Some(Frame::Response { .. })) => {
                break Err(FrameError::Unexpected(FrameType::RESPONSE).into())
            }
            Ok(Some(Frame::Error { .. })) => {
                break Err(FrameError::Unexpected(FrameType::ERROR).into())
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let Some(target) = resolve(&req.target) else {
            tracing::debug!(target = %req.target, "forwarded command for an unknown target");
            let _ = tx.send((encode_error(tag, ErrorCode::UNKNOWN_TARGET), slot));
            continue;
        };
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send((run(&target, tag, req), slot));
        });
    };
    match ended {
        // The partner is done sending: answer what is in flight, then close.
        Ok(()) => {
            drop(tx);
            match writer.await {
                Ok(r) => r.map_err(Closed::from),
                Err(e) => Err(io::Error::other(e).into()),
            }
        }
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

/// Task management functions a partner forwards (`ProxyRequest::tmf`).
pub const TMF_ABORT_TASK_SET: u8 = 1;
pub const TMF_CLEAR_TASK_SET: u8 = 2;
pub const TMF_LOGICAL_UNIT_RESET: u8 = 3;
pub const TMF_TARGET_WARM_RESET: u8 = 4;
/// Also ends every session of the target on the owner.
pub const TMF_TARGET_COLD_RESET: u8 = 5;
/// Not a function an initiator sends: the partner reports that this I_T
/// nexus is gone (logout, connection lost), so RESERVE(6) is released and
/// the nexus's tasks end on the owner as they would for a direct session.
pub const TMF_NEXUS_LOSS: u8 = 6;
/// Their outcome, in the RESPONSE's status byte.
pub const TMF_RESULT_COMPLETE: u8 = 0;
pub const TMF_RESULT_NO_SUCH_LUN: u8 = 1;
pub const TMF_RESULT_NOT_SUPPORTED: u8 = 2;
pub const TMF_RESULT_REJECTED: u8 = 3;

fn run_tmf(target: &ScsiTarget, req: &ProxyRequest, nexus: &ItNexus) -> u8 {
    use nvtarget_scsi::{TmfFunction as F, TmfResponse as R};
    if req.tmf == TMF_NEXUS_LOSS {
        target.nexus_loss(nexus);
        return TMF_RESULT_COMPLETE;
    }
    let func = match req.tmf {
        TMF_ABORT_TASK_SET => F::AbortTaskSet,
        TMF_CLEAR_TASK_SET => F::ClearTaskSet,
        TMF_LOGICAL_UNIT_RESET => F::LogicalUnitReset,
        TMF_TARGET_WARM_RESET => F::TargetWarmReset,
        TMF_TARGET_COLD_RESET => F::TargetColdReset,
        _ => return TMF_RESULT_NOT_SUPPORTED,
    };
    match target.task_mgmt(func, req.lun, nexus) {
        R::Complete if req.tmf == TMF_TARGET_COLD_RESET => {
            // RFC 7143 11.5.1: a cold reset ends every session of the
            // target; the partner ends the ones that came through it.
            crate::portal::close_target_sessions(&req.target, u64::MAX);
            TMF_RESULT_COMPLETE
        }
        R::Complete => TMF_RESULT_COMPLETE,
        R::NoSuchLun => TMF_RESULT_NO_SUCH_LUN,
        R::NotSupported => TMF_RESULT_NOT_SUPPORTED,
        R::Rejected => TMF_RESULT_REJECTED,
    }
}

/// Runs one forwarded command; always produces an answer, so the partner's
/// waiter is never left hanging.
fn run(target: &ScsiTarget, tag: u32, req: ProxyRequest) -> WireFrame {
    let nexus = ItNexus::from(req.nexus.clone());
    if req.tmf != 0 {
        return match std::panic::catch_unwind(AssertUnwindSafe(|| run_tmf(target, &req, &nexus))) {
            Ok(status) => encode_response(
                tag,
                &ProxyResponse {
                    status,
                    ..ProxyResponse::default()
                },
            )
            .unwrap_or_else(|_| encode_error(tag, ErrorCode::EXECUTION_FAILED)),
            Err(_) => encode_error(tag, ErrorCode::EXECUTION_FAILED),
        };
    }
    let cmd = ScsiCommand {
        lun: req.lun,
        cdb: &req.cdb,
        attr: req.attr,
        data_out: &req.data_out,
        expected_in_len: req.expected_in_len,
        nexus: &nexus,
    };
    // A panic inside the SCSI layer must still answer the partner.
    match std::panic::catch_unwind(AssertUnwindSafe(|| target.execute(&cmd))) {
        Ok(r) => encode_response(tag, &ProxyResponse::from(r)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "forwarded command's answer does not fit a frame");
            encode_error(tag, ErrorCode::RESPONSE_TOO_LARGE)
        }),
        Err(_) => {
            tracing::error!(initiator = %nexus.initiator_port, "forwarded command panicked");
            encode_error(tag, ErrorCode::EXECUTION_FAILED)
        }
    }
}

/// How a waiter's request ended.
enum Outcome {
    Done(ProxyResponse),
    Refused(ErrorCode),
    Down(Option<FrameError>),
}

struct Waiters {
    next_tag: u32,
    by_tag: HashMap<u32, oneshot::Sender<Outcome>>,
}

/// The state a client connection's two tasks and its callers share.
struct Link {
    /// `None` once the connection is down: nobody can start waiting then.
    waiters: parking_lot::Mutex<Option<Waiters>>,
    down: watch::Sender<bool>,
}

impl Link {
    fn is_up(&self) -> bool {
        self.waiters.lock().is_some()
    }

    fn register(&self) -> Option<(u32, oneshot::Receiver<Outcome>)> {
        let mut g = self.waiters.lock();
        let w = g.as_mut()?;
        let (tx, rx) = oneshot::channel();
        loop {
            let tag = w.next_tag;
            w.next_tag = w.next_tag.wrapping_add(1);
            // A tag still waiting after 2^32 requests is skipped.
            if let Entry::Vacant(v) = w.by_tag.entry(tag) {
                v.insert(tx);
                return Some((tag, rx));
            }
        }
    }

    /// Hands an answer to its waiter, if it is still waiting (a cancelled
    /// `execute` has forgotten its tag).
    fn complete(&self, tag: u32, outcome: Outcome) {
        let waiter = self
            .waiters
            .lock()
            .as_mut()
            .and_then(|w| w.by_tag.remove(&tag));
        if let Some(w) = waiter {
            let _ = w.send(outcome);
        }
    }

    fn forget(&self, tag: u32) {
        if let Some(w) = self.waiters.lock().as_mut() {
            w.by_tag.remove(&tag);
        }
    }

    /// Takes the connection down and fails every waiter. True for the first
    /// caller only, which logs why.
    fn fail(&self, why: Option<FrameError>) -> bool {
        let taken = self.waiters.lock().take();
        self.down.send_replace(true);
        let Some(w) = taken else {
            return false;
        };
        for (_, tx) in w.by_tag {
            let _ = tx.send(Outcome::Down(why.clone()));
        }
        true
    }

    async fn wait_down(&self) {
        let mut rx = self.down.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }
}

/// One connection to the owner.
struct Conn {
    link: Arc<Link>,
    /// Closing it (dropping the last client) ends the connection.
    tx: mpsc::UnboundedSender<(WireFrame, ())>,
}

impl Conn {
    async fn open(owner: SocketAddr) -> io::Result<Conn> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(owner))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let (mut rd, wr) = stream.into_split();
        let link = Arc::new(Link {
            waiters: parking_lot::Mutex::new(Some(Waiters {
                next_tag: 0,
                by_tag: HashMap::new(),
            })),
            down: watch::channel(false).0,
        });
        let (tx, rx) = mpsc::unbounded_channel();

        let l = link.clone();
        tokio::spawn(async move {
            let r = tokio::select! {
                r = write_frames(wr, Some(PREFACE), rx) => r,
                () = l.wait_down() => return,
            };
            if l.fail(None) {
                if let Err(e) = r {
                    tracing::warn!(%owner, error = %e, "proxy connection to the owner lost");
                }
            }
        });

        let l = link.clone();
        tokio::spawn(async move {
            let r = tokio::select! {
                r = read_answers(&mut rd, &l) => r,
                () = l.wait_down() => return,
            };
            let why = match &r {
                Err(Closed::Protocol(e)) => Some(e.clone()),
                _ => None,
            };
            if l.fail(why) {
                match r {
                    Ok(()) => tracing::info!(%owner, "owner closed the proxy connection"),
                    Err(e) => {
                        tracing::warn!(%owner, error = %e, "proxy connection to the owner lost")
                    }
                }
            }
        });
        Ok(Conn { link, tx })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Nobody can send on it any more: stop the reader too.
        self.link.fail(None);
    }
}

async fn read_answers(rd: &mut OwnedReadHalf, link: &Link) -> Result<(), Closed> {
    let mut buf = BytesMut::new();
    loop {
        match read_frame(rd, &mut buf).await? {
            Some(Frame::Response { tag, resp }) => link.complete(tag, Outcome::Done(resp)),
            Some(Frame::Error { tag, code }) => link.complete(tag, Outcome::Refused(code)),
            Some(Frame::Request { .. }) => {
                return Err(FrameError::Unexpected(FrameType::REQUEST).into())
            }
            None => return Ok(()),
        }
    }
}

/// Forgets a tag when `execute` ends early (cancelled, or failed to send).
struct Forget<'a> {
    link: &'a Link,
    tag: u32,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.link.forget(self.tag);
    }
}

struct ClientShared {
    owner: SocketAddr,
    conn: parking_lot::Mutex<Option<Arc<Conn>>>,
    /// Held while connecting; holds the last attempt's failure.
    connecting: tokio::sync::Mutex<Option<Arc<io::Error>>>,
    /// Finished connection attempts, so callers queued behind a failing
    /// attempt share its error instead of each waiting out a timeout.
    attempts: AtomicU64,
}

/// Partner side: a pipelined connection to the owner's interconnect address,
/// opened on first use and reopened by the first call after a failure.
/// Clones share the connection.
#[derive(Clone)]
pub struct ProxyClient {
    inner: Arc<ClientShared>,
}

impl fmt::Debug for ProxyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyClient")
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

impl ProxyClient {
    pub fn new(owner: SocketAddr) -> Self {
        Self {
            inner: Arc::new(ClientShared {
                owner,
                conn: parking_lot::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(None),
                attempts: AtomicU64::new(0),
            }),
        }
    }

    /// Runs `req` on the owner. Ends with the owner's answer or an error,
    /// never hangs on a lost connection; cancel-safe.
    pub async fn execute(&self, req: ProxyRequest) -> Result<ProxyResponse, ProxyError> {
        // What cannot be sent must not cost a connection.
        request_body_len(&req).map_err(ProxyError::Request)?;
        let conn = self.connection().await?;
        let (tag, answer) = conn.link.register().ok_or(ProxyError::ConnectionLost)?;
        let _forget = Forget {
            link: &conn.link,
            tag,
        };
        let frame = encode_request(tag, &req).map_err(ProxyError::Request)?;
        conn.tx
            .send((frame, ()))
            .map_err(|_| ProxyError::ConnectionLost)?;
        match answer.await {
            Ok(Outcome::Done(resp)) => Ok(resp),
            Ok(Outcome::Refused(ErrorCode::UNKNOWN_TARGET)) => {
                Err(ProxyError::UnknownTarget(req.target))
            }
            Ok(Outcome::Refused(code)) => Err(ProxyError::Owner(code)),
            Ok(Outcome::Down(Some(e))) => Err(ProxyError::Protocol(e)),
            Ok(Outcome::Down(None)) | Err(_) => Err(ProxyError::ConnectionLost),
        }
    }

    fn live(&self) -> Option<Arc<Conn>> {
        self.inner
            .conn
            .lock()
            .as_ref()
            .filter(|c| c.link.is_up())
            .cloned()
    }

    async fn connection(&self) -> Result<Arc<Conn>, ProxyError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let s = &self.inner;
        let seen = s.attempts.load(Ordering::Acquire);
        let mut last_error = s.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        if s.attempts.load(Ordering::Acquire) != seen {
            if let Some(e) = &*last_error {
                return Err(ProxyError::Connect {
                    owner: s.owner,
                    source: e.clone(),
                });
            }
        }
        let opened = Conn::open(s.owner).await;
        s.attempts.fetch_add(1, Ordering::Release);
        match opened {
            Ok(c) => {
                let c = Arc::new(c);
                *last_error = None;
                *s.conn.lock() = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                let e = Arc::new(e);
                *last_error = Some(e.clone());
                Err(ProxyError::Connect {
                    owner: s.owner,
                    source: e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;
    use std::sync::{Condvar, Mutex};

    use nvtarget_scsi::{status, BlockDevice, DevError, LunConfig, MemDevice, TargetConfig};
    use proptest::prelude::*;
    use tokio::net::TcpListener;
    use tokio::task::JoinSet;

    const TARGET: &str = "iqn.2026-11.io.nvtarget:a";
    const BS: usize = 512;

    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("test timed out")
    }

    fn mem_target() -> Arc<ScsiTarget> {
        target_on(Arc::new(MemDevice::new(1024, BS as u32)))
    }

    fn target_on(dev: Arc<dyn BlockDevice>) -> Arc<ScsiTarget> {
        Arc::new(ScsiTarget::new(
            TargetConfig::single_port(TARGET),
            vec![LunConfig::new(0, dev)],
        ))
    }

    fn resolver(t: Arc<ScsiTarget>) -> Resolver {
        Arc::new(move |name: &str| (name == TARGET).then(|| t.clone()))
    }

    /// Waits until the preface has arrived, leaving it unread, as the
    /// interconnect listener does before handing the stream over.
    async fn has_preface(s: &TcpStream) -> bool {
        let mut p = [0u8; 4];
        loop {
            match s.peek(&mut p).await {
                Ok(4) => return p == PREFACE,
                Ok(0) | Err(_) => return false,
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// An owner serving `t`; counts the connections it accepted.
    async fn owner(t: Arc<ScsiTarget>) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        let resolve = resolver(t);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let resolve = resolve.clone();
                tokio::spawn(async move {
                    if has_preface(&s).await {
                        serve_connection(s, resolve).await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn nexus(name: &str, isid: u64, relative_port: u16) -> ForwardedNexus {
        ForwardedNexus {
            initiator_port: format!("{name},i,0x{isid:012x}"),
            initiator_name: name.into(),
            isid,
            relative_port,
            tpgt: relative_port,
        }
    }

    fn request(n: &ForwardedNexus, cdb: Vec<u8>, data_out: Vec<u8>) -> ProxyRequest {
        ProxyRequest {
            tmf: 0,
            target: TARGET.into(),
            lun: 0,
            cdb: cdb.into(),
            attr: TaskAttr::Simple,
            data_out: data_out.into(),
            expected_in_len: 1 << 20,
            nexus: n.clone(),
        }
    }

    fn rw16(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = op;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(131)) as u8)
            .collect()
    }

    async fn good(c: &ProxyClient, req: ProxyRequest) -> Bytes {
        let r = c.execute(req).await.unwrap();
        assert_eq!(r.status, status::GOOD, "sense {:02x?}", r.sense);
        r.data
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_then_read_through_the_proxy() {
        bounded(async {
            let (addr, _) = owner(mem_target()).await;
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let data = pattern(7, 8 * BS);
            good(&c, request(&a, rw16(0x8a, 10, 8), data.clone())).await;
            let got = good(&c, request(&a, rw16(0x88, 10, 8), vec![])).await;
            assert_eq!(got, data);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_requests_in_flight_on_one_connection() {
        bounded(async {
            let (addr, accepted) = owner(mem_target()).await;
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let mut set = JoinSet::new();
            for i in 0..64u64 {
                let (c, a) = (c.clone(), a.clone());
                set.spawn(async move {
                    good(&c, request(&a, rw16(0x8a, i, 1), pattern(i, BS))).await;
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
            for i in 0..64u64 {
                let (c, a) = (c.clone(), a.clone());
                set.spawn(async move {
                    let got = good(&c, request(&a, rw16(0x88, i, 1), vec![])).await;
                    assert_eq!(got, pattern(i, BS), "lba {i}");
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_are_matched_by_tag_when_out_of_order() {
        bounded(async {
            const N: usize = 8;
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            // An owner that collects every request, then answers them in
            // reverse, each with its own CDB as the data.
            tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let (mut rd, mut wr) = s.into_split();
                let mut p = [0u8; 4];
                rd.read_exact(&mut p).await.unwrap();
                let mut buf = BytesMut::new();
                let mut reqs = Vec::new();
                while reqs.len() < N {
                    match read_frame(&mut rd, &mut buf).await.unwrap() {
                        Some(Frame::Request { tag, req }) => reqs.push((tag, req)),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                for (tag, req) in reqs.into_iter().rev() {
                    let resp = ProxyResponse {
                        status: 0,
                        sense: Bytes::new(),
                        data: req.cdb,
                    };
                    let f = encode_response(tag, &resp).unwrap();
                    wr.write_all(&f.to_vec()).await.unwrap();
                }
                // Keep the connection until the client is done.
                let _ = rd.read(&mut [0u8; 1]).await;
            });
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let mut set = JoinSet::new();
            for i in 0..N as u8 {
                let (c, a) = (c.clone(), a.clone());
                set.spawn(async move {
                    let cdb = vec![0x12, 0, 0, 0, i, 0];
                    let got = c.execute(request(&a, cdb.clone(), vec![])).await.unwrap();
                    assert_eq!(got.data, cdb);
                });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        })
        .await;
    }

    fn prout(sa: u8, rtype: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
        let mut c = vec![0u8; 10];
        c[0] = 0x5f;
        c[1] = sa;
        c[2] = rtype;
        c[8] = 24;
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        (c, p)
    }

    fn local(t: &ScsiTarget, n: &ForwardedNexus, cdb: &[u8], out: &[u8]) -> u8 {
        let nexus = ItNexus::from(n.clone());
        t.execute(&ScsiCommand {
            lun: 0,
            cdb,
            attr: TaskAttr::Simple,
            data_out: out,
            expected_in_len: 1 << 20,
            nexus: &nexus,
        })
        .status
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_nexus_reaches_the_target() {
        bounded(async {
            let t = mem_target();
            let (addr, _) = owner(t.clone()).await;
            let c = ProxyClient::new(addr);
            // Initiator A comes in through the partner's port 2.
            let a = nexus("iqn.a", 0x2345, 2);
            let (cdb, p) = prout(0x06, 0, 0, 0xa); // REGISTER key 0xa
            good(&c, request(&a, cdb, p)).await;
            let (cdb, p) = prout(0x01, 1, 0xa, 0); // RESERVE, write exclusive
            good(&c, request(&a, cdb, p)).await;

            // READ FULL STATUS: one registration, A's, through port 2,
            // holding the reservation.
            let full = vec![0x5e, 3, 0, 0, 0, 0, 0, 0x10, 0, 0];
            let d = good(&c, request(&a, full, vec![])).await;
            assert_eq!(&d[8..16], &0xau64.to_be_bytes(), "key");
            assert_eq!(d[20] & 1, 1, "R_HOLDER");
            assert_eq!(d[21] & 0x0f, 1, "type");
            assert_eq!(&d[26..28], &2u16.to_be_bytes(), "relative port");
            let tid = &d[32..];
            let port = a.initiator_port.as_bytes();
            assert!(
                tid.windows(port.len())
                    .any(|w| w.eq_ignore_ascii_case(port)),
                "TransportID names A's initiator port: {tid:02x?}"
            );

            let write = rw16(0x8a, 0, 1);
            // The holder writes through the proxy...
            good(&c, request(&a, write.clone(), vec![1; BS])).await;
            // ...another initiator on the owner's own port conflicts...
            let b = nexus("iqn.b", 0x77, 1);
            assert_eq!(
                local(&t, &b, &write, &[2; BS]),
                status::RESERVATION_CONFLICT
            );
            // ...and so does A itself on port 1: the registration is A's
            // I_T nexus through port 2, so the relative port arrived too.
            let a1 = nexus("iqn.a", 0x2345, 1);
            assert_eq!(
                local(&t, &a1, &write, &[3; BS]),
                status::RESERVATION_CONFLICT
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_target_is_an_error_and_the_connection_stays() {
        bounded(async {
            let (addr, accepted) = owner(mem_target()).await;
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let mut req = request(&a, vec![0; 6], vec![]);
            req.target = "iqn.2026-11.io.nvtarget:nope".into();
            match c.execute(req).await {
                Err(ProxyError::UnknownTarget(t)) => assert_eq!(t, "iqn.2026-11.io.nvtarget:nope"),
                other => panic!("expected UnknownTarget, got {other:?}"),
            }
            good(&c, request(&a, vec![0; 6], vec![])).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_connection_fails_every_waiter_and_the_next_call_reconnects() {
        bounded(async {
            const N: usize = 16;
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let resolve = resolver(mem_target());
            tokio::spawn(async move {
                // The first owner connection reads every request, then dies.
                let (s, _) = l.accept().await.unwrap();
                let (mut rd, _wr) = s.into_split();
                let mut p = [0u8; 4];
                rd.read_exact(&mut p).await.unwrap();
                let mut buf = BytesMut::new();
                for _ in 0..N {
                    read_frame(&mut rd, &mut buf).await.unwrap().unwrap();
                }
                drop((rd, _wr));
                // The next one is served.
                let (s, _) = l.accept().await.unwrap();
                serve_connection(s, resolve).await;
            });
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let mut set = JoinSet::new();
            for _ in 0..N {
                let (c, a) = (c.clone(), a.clone());
                set.spawn(async move { c.execute(request(&a, vec![0; 6], vec![])).await });
            }
            tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(r) = set.join_next().await {
                    assert!(
                        matches!(r.unwrap(), Err(ProxyError::ConnectionLost)),
                        "waiter must see the loss"
                    );
                }
            })
            .await
            .expect("every waiter fails within 2 s");
            good(&c, request(&a, vec![0; 6], vec![])).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_owner_fails_fast() {
        bounded(async {
            let addr = {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                l.local_addr().unwrap()
            };
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let started = std::time::Instant::now();
            let mut set = JoinSet::new();
            for _ in 0..8 {
                let (c, a) = (c.clone(), a.clone());
                set.spawn(async move { c.execute(request(&a, vec![0; 6], vec![])).await });
            }
            while let Some(r) = set.join_next().await {
                assert!(matches!(r.unwrap(), Err(ProxyError::Connect { .. })));
            }
            assert!(started.elapsed() < Duration::from_secs(2));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_request_is_refused_before_connecting() {
        bounded(async {
            // Nothing listens here: a connection attempt would fail differently.
            let c = ProxyClient::new("127.0.0.1:9".parse().unwrap());
            let a = nexus("iqn.a", 1, 2);
            let r = c.execute(request(&a, vec![0; MAX_CDB + 1], vec![])).await;
            assert!(matches!(
                r,
                Err(ProxyError::Request(FrameError::TooLong { what: "CDB", .. }))
            ));
        })
        .await;
    }

    /// A device whose reads wait for a gate, counting how many are waiting.
    struct GatedDevice {
        inner: MemDevice,
        entered: AtomicUsize,
        open: Mutex<bool>,
        cv: Condvar,
    }

    impl BlockDevice for GatedDevice {
        fn block_size(&self) -> u32 {
            self.inner.block_size()
        }
        fn num_blocks(&self) -> u64 {
            self.inner.num_blocks()
        }
        fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
            drop(open);
            self.inner.read(lba, buf)
        }
        fn write(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DevError> {
            self.inner.write(lba, data, fua)
        }
        fn flush(&self) -> Result<(), DevError> {
            self.inner.flush()
        }
        fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DevError> {
            self.inner.unmap(lba, blocks)
        }
    }

    impl GatedDevice {
        fn open(&self) {
            *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.cv.notify_all();
        }
    }

    /// Opens the gate however the test ends: the runtime's shutdown waits
    /// for blocking threads, so a failed assertion must not leave them shut.
    struct OpenOnDrop(Arc<GatedDevice>);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owner_runs_at_most_max_in_flight_per_connection() {
        bounded(async {
            let dev = Arc::new(GatedDevice {
                inner: MemDevice::new(1024, BS as u32),
                entered: AtomicUsize::new(0),
                open: Mutex::new(false),
                cv: Condvar::new(),
            });
            let gate = OpenOnDrop(dev.clone());
            let (addr, _) = owner(target_on(dev.clone())).await;
            let c = ProxyClient::new(addr);
            let a = nexus("iqn.a", 1, 2);
            let total = MAX_IN_FLIGHT + 20;
            let mut set = JoinSet::new();
            for i in 0..total as u64 {
                let (c, a) = (c.clone(), a.clone());
                set.spawn(async move { good(&c, request(&a, rw16(0x88, i, 1), vec![])).await });
            }
            while dev.entered.load(Ordering::SeqCst) < MAX_IN_FLIGHT {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(dev.entered.load(Ordering::SeqCst), MAX_IN_FLIGHT);
            drop(gate);
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
            assert_eq!(dev.entered.load(Ordering::SeqCst), total);
        })
        .await;
    }

    /// Serves `input` (preface included) to `serve_connection` and returns
    /// what it answered before closing; fails if it does not close.
    async fn serve_bytes(input: Vec<u8>) -> Vec<u8> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            serve_connection(s, resolver(mem_target())).await;
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&input).await.unwrap();
        let mut out = Vec::new();
        // The server closes on bad input even though we keep our side open.
        let _ = s.read_to_end(&mut out).await;
        server.await.unwrap();
        out
    }

    fn sample_request() -> ProxyRequest {
        request(&nexus("iqn.a", 1, 2), rw16(0x8a, 3, 1), pattern(3, BS))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_closes_on_bad_input() {
        bounded(async {
            // Wrong preface.
            assert!(serve_bytes(b"NVMI garbage".to_vec()).await.is_empty());
            // Garbage after a good preface.
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&[0xff; 40]);
            assert!(serve_bytes(input).await.is_empty());
            // An oversized frame: refused on its header.
            let mut input = PREFACE.to_vec();
            let mut h = BytesMut::new();
            put_header(&mut h, FrameType::REQUEST, 1, 0);
            input.extend_from_slice(&h);
            input[4 + LEN_OFF..4 + HEADER_LEN]
                .copy_from_slice(&(MAX_BODY as u32 + 1).to_be_bytes());
            assert!(serve_bytes(input).await.is_empty());
            // A good request answered, then a RESPONSE frame from the
            // partner, which closes the connection.
            let mut input = PREFACE.to_vec();
            input.extend(encode_request(5, &sample_request()).unwrap().to_vec());
            input.extend(
                encode_response(6, &ProxyResponse::default())
                    .unwrap()
                    .to_vec(),
            );
            let out = serve_bytes(input).await;
            let mut buf = BytesMut::from(&out[..]);
            // The answer may or may not have made it out before the close.
            if let Some(f) = decode_frame(&mut buf).unwrap() {
                assert_eq!(f.tag(), 5);
            }
        })
        .await;
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        decode_frame(&mut buf)
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Request {
                tag: 1,
                req: sample_request(),
            },
            Frame::Response {
                tag: u32::MAX,
                resp: ProxyResponse {
                    status: 2,
                    sense: Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10]),
                    data: Bytes::from_static(b"data"),
                },
            },
            Frame::Error {
                tag: 0,
                code: ErrorCode::UNKNOWN_TARGET,
            },
        ];
        for f in frames {
            let bytes = f.encode().unwrap().to_vec();
            let mut buf = BytesMut::from(&bytes[..]);
            // Byte by byte: "need more" until the last one.
            for n in 0..bytes.len() {
                assert_eq!(decode_all(&bytes[..n]).unwrap(), None, "prefix {n}");
            }
            assert_eq!(decode_frame(&mut buf).unwrap(), Some(f));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn refuses_bad_frames() {
        let good = encode_request(9, &sample_request()).unwrap().to_vec();
        let with = |off: usize, b: &[u8]| {
            let mut v = good.clone();
            v[off..off + b.len()].copy_from_slice(b);
            decode_all(&v)
        };
        let body = HEADER_LEN;
        assert!(matches!(with(0, b"XXXX"), Err(FrameError::BadMagic(_))));
        assert!(matches!(
            with(TYPE_OFF, &[9]),
            Err(FrameError::UnknownType(_))
        ));
        assert!(matches!(with(5, &[1]), Err(FrameError::Reserved(_))));
        assert!(matches!(with(body + 12, &[5]), Err(FrameError::BadAttr(5))));
        // Byte 13 names a task management function (any value decodes;
        // the owner refuses the ones it does not know).
        assert!(matches!(
            with(body + 13, &[TMF_LOGICAL_UNIT_RESET]),
            Ok(Some(Frame::Request { ref req, .. })) if req.tmf == TMF_LOGICAL_UNIT_RESET
        ));
        assert!(matches!(
            with(body + 14, &(MAX_CDB as u16 + 1).to_be_bytes()),
            Err(FrameError::TooLong { what: "CDB", .. })
        ));
        // Inner lengths that disagree with body_len.
        assert!(matches!(
            with(body + 32, &[0, 0, 0x20, 0]),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            with(body + 32, &[0, 0, 0, 0]),
            Err(FrameError::Trailing(_))
        ));
        // A header claiming more than the limit is refused before its body.
        let mut h = good[..HEADER_LEN].to_vec();
        h[LEN_OFF..].copy_from_slice(&(MAX_BODY as u32 + 1).to_be_bytes());
        assert!(matches!(
            decode_all(&h),
            Err(FrameError::TooLong { what: "body", .. })
        ));
        // Truncated: body_len one short of the request's own lengths.
        let mut v = good.clone();
        v.pop();
        let short = (v.len() - HEADER_LEN) as u32;
        v[LEN_OFF..HEADER_LEN].copy_from_slice(&short.to_be_bytes());
        assert!(matches!(
            decode_all(&v),
            Err(FrameError::Truncated("Data-Out"))
        ));
        // Not UTF-8 in the target name.
        assert!(matches!(
            with(body + 36, &[0xff]),
            Err(FrameError::NotUtf8(_))
        ));
        // Too-long strings cannot even be encoded.
        let mut r = sample_request();
        r.target = "t".repeat(MAX_STRING + 1);
        assert!(matches!(
            encode_request(1, &r),
            Err(FrameError::TooLong {
                what: "target name",
                ..
            })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_ending_inside_a_frame_is_an_error() {
        bounded(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let good = encode_request(9, &sample_request()).unwrap().to_vec();
            let sender = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&good[..good.len() - 3]).await.unwrap();
            });
            let (s, _) = l.accept().await.unwrap();
            sender.await.unwrap();
            let (mut rd, _wr) = s.into_split();
            let mut buf = BytesMut::new();
            assert!(matches!(
                read_frame(&mut rd, &mut buf).await,
                Err(Closed::Protocol(FrameError::EndInsideFrame))
            ));
        })
        .await;
    }

    fn arb_attr() -> impl Strategy<Value = TaskAttr> {
        prop::sample::select(vec![
            TaskAttr::Untagged,
            TaskAttr::Simple,
            TaskAttr::Ordered,
            TaskAttr::HeadOfQueue,
            TaskAttr::Aca,
        ])
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let bytes = |max: usize| prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
        let req = (
            any::<u32>(),
            "[a-z:.0-9-]{0,40}",
            any::<u64>(),
            bytes(MAX_CDB + 1),
            arb_attr(),
            bytes(600),
            any::<u32>(),
            (
                "[a-z:.,0-9]{0,60}",
                "\\PC{0,20}",
                any::<u64>(),
                any::<u16>(),
                any::<u16>(),
            ),
        )
            .prop_map(
                |(tag, target, lun, cdb, attr, data_out, expected_in_len, n)| Frame::Request {
                    tag,
                    req: ProxyRequest {
                        tmf: (tag % 5) as u8,
                        target,
                        lun,
                        cdb,
                        attr,
                        data_out,
                        expected_in_len,
                        nexus: ForwardedNexus {
                            initiator_port: n.0,
                            initiator_name: n.1,
                            isid: n.2,
                            relative_port: n.3,
                            tpgt: n.4,
                        },
                    },
                },
            );
        let resp = (any::<u32>(), any::<u8>(), bytes(300), bytes(600)).prop_map(
            |(tag, status, sense, data)| Frame::Response {
                tag,
                resp: ProxyResponse {
                    status,
                    sense,
                    data,
                },
            },
        );
        let err = (any::<u32>(), any::<u32>()).prop_map(|(tag, c)| Frame::Error {
            tag,
            code: ErrorCode(c),
        });
        prop_oneof![req, resp, err]
    }

    /// What an accepted input must satisfy: it re-encodes to exactly the
    /// bytes it was decoded from.
    fn check_decode(input: &[u8]) {
        let mut buf = BytesMut::from(input);
        if let Ok(Some(f)) = decode_frame(&mut buf) {
            let used = input.len() - buf.len();
            assert_eq!(f.encode().unwrap().to_vec(), &input[..used]);
        }
    }

    proptest! {
        #[test]
        fn any_frame_round_trips(f in arb_frame()) {
            let bytes = f.encode().unwrap().to_vec();
            let mut buf = BytesMut::from(&bytes[..]);
            prop_assert_eq!(decode_frame(&mut buf).unwrap(), Some(f));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn garbage_never_panics(mut input in prop::collection::vec(any::<u8>(), 0..200), magic in any::<bool>()) {
            if magic && input.len() >= 4 {
                // Get past the magic check now and then.
                input[..4].copy_from_slice(&MAGIC);
            }
            check_decode(&input);
        }

        #[test]
        fn mutated_frames_never_panic(
            f in arb_frame(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = f.encode().unwrap().to_vec();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            check_decode(&bytes);
            check_decode(&bytes[..cut.index(bytes.len() + 1)]);
        }
    }
}
