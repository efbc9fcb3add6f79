//! The enumerations of the proxy-wasm ABI, as numbers on the wire.

/// A proxy-wasm status code, the `i32` every host function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// 0: success.
    Ok = 0,
    /// 1: the key, context, token or buffer does not exist.
    NotFound = 1,
    /// 2: an argument is invalid or the call is not allowed in this phase.
    BadArgument = 2,
    /// 3: a value could not be serialized.
    SerializationFailure = 3,
    /// 4: a value could not be parsed.
    ParseFailure = 4,
    /// 5: an expression is invalid.
    BadExpression = 5,
    /// 6: a guest pointer or length lies outside the guest's memory.
    InvalidMemoryAccess = 6,
    /// 7: the queue is empty.
    Empty = 7,
    /// 8: compare-and-swap mismatch.
    CasMismatch = 8,
    /// 9: result mismatch.
    ResultMismatch = 9,
    /// 10: the host failed internally.
    InternalFailure = 10,
    /// 11: the connection was broken (used by `proxy_get_status` after a failed callout).
    BrokenConnection = 11,
    /// 12: the host does not implement this call.
    Unimplemented = 12,
}

impl Status {
    /// The number the guest sees.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Which ABI version a module declares through its marker export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_1_0`.
    V0_1_0,
    /// `proxy_abi_version_0_2_0`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1` (and vNEXT).
    V0_2_1,
}

impl AbiVersion {
    /// The marker export name of this version.
    pub fn marker(self) -> &'static str {
        match self {
            Self::V0_1_0 => "proxy_abi_version_0_1_0",
            Self::V0_2_0 => "proxy_abi_version_0_2_0",
            Self::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }

    /// Find the version from a module's export names (the newest marker wins).
    pub fn from_exports<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<Self> {
        let mut found = None;
        names.try_for_each(|n| {
            let v = match n {
                "proxy_abi_version_0_2_1" | "proxy_abi_version_vNEXT" => Some(Self::V0_2_1),
                "proxy_abi_version_0_2_0" => Some(Self::V0_2_0),
                "proxy_abi_version_0_1_0" => Some(Self::V0_1_0),
                _ => None,
            };
            if let Some(v) = v {
                found = Some(match found {
                    Some(old) if rank(old) > rank(v) => old,
                    _ => v,
                });
            }
            Some(())
        });
        fn rank(v: AbiVersion) -> u8 {
            match v {
                AbiVersion::V0_1_0 => 0,
                AbiVersion::V0_2_0 => 1,
                AbiVersion::V0_2_1 => 2,
            }
        }
        found
    }
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V0_1_0 => "0.1.0",
            Self::V0_2_0 => "0.2.0",
            Self::V0_2_1 => "0.2.1",
        })
    }
}

/// Buffer types of `proxy_get_buffer_bytes`.
pub(crate) mod buffer {
    pub const REQUEST_BODY: i32 = 0;
    pub const RESPONSE_BODY: i32 = 1;
    pub const DOWNSTREAM_DATA: i32 = 2;
    pub const UPSTREAM_DATA: i32 = 3;
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    pub const GRPC_RECEIVE_BUFFER: i32 = 5;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
    pub const CALL_DATA: i32 = 8;
}

/// Map types of the header-map calls.
pub(crate) mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const REQUEST_TRAILERS: i32 = 1;
    pub const RESPONSE_HEADERS: i32 = 2;
    pub const RESPONSE_TRAILERS: i32 = 3;
    pub const GRPC_INITIAL_METADATA: i32 = 4;
    pub const GRPC_TRAILING_METADATA: i32 = 5;
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// Filter log levels (`proxy_log`, `proxy_get_log_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// 0.
    Trace,
    /// 1.
    Debug,
    /// 2.
    Info,
    /// 3.
    Warn,
    /// 4.
    Error,
    /// 5.
    Critical,
}

impl LogLevel {
    /// From the wire number; out-of-range numbers are `None`.
    pub fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }

    /// The wire number.
    pub fn as_i32(self) -> i32 {
        self as i32
    }
}
