package vhost

// vhost-user wire format (QEMU docs/interop/vhost-user.rst, "Message
// Specification"): a 12-byte header {u32 request, u32 flags, u32 size} in
// host byte order, then size bytes of payload. File descriptors ride along
// as SCM_RIGHTS ancillary data. Every payload shape below has a fixed layout
// (the front-end's C structs are packed); the decoders check exact sizes and
// never read past the slice.

import (
	"encoding/binary"
	"fmt"

	"github.com/vsdp/vsdp/vhost/guestmem"
)

// ne is the wire byte order: the spec says host byte order.
var ne = binary.NativeEndian

// HeaderSize is the size of a message header.
const HeaderSize = 12

// MaxPayload bounds a message payload (rust-vmm's MAX_MSG_SIZE). A header
// announcing more makes the stream unparsable and ends the connection.
const MaxPayload = 4096

// MaxFDs bounds the file descriptors attached to one message (rust-vmm's
// MAX_ATTACHED_FD_ENTRIES); more make the message invalid and are closed.
const MaxFDs = 32

// MaxMemTableRegions is the region limit of SET_MEM_TABLE
// (VHOST_MEMORY_BASELINE_NREGIONS).
const MaxMemTableRegions = 8

// MaxConfigSize bounds a GET_CONFIG/SET_CONFIG access
// (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
const MaxConfigSize = 256

// Header flag bits.
const (
	FlagVersion   = 0x1 // bits 0-1 hold the protocol version, which is 1
	FlagReply     = 0x4 // set by the back-end on every reply
	FlagNeedReply = 0x8 // REPLY_ACK: the front-end wants a u64 status

	versionMask = 0x3
	knownFlags  = versionMask | FlagReply | FlagNeedReply
)

// Virtio feature bits the core negotiates itself (virtio 1.2 §6; vhost-user
// "Feature bits").
const (
	FeatureIndirectDesc     uint64 = 1 << 28 // VIRTIO_F_RING_INDIRECT_DESC
	FeatureEventIdx         uint64 = 1 << 29 // VIRTIO_F_RING_EVENT_IDX
	FeatureProtocolFeatures uint64 = 1 << 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         uint64 = 1 << 32 // VIRTIO_F_VERSION_1
)

// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
const (
	ProtocolMQ                  uint64 = 1 << 0
	ProtocolLogShmfd            uint64 = 1 << 1
	ProtocolRARP                uint64 = 1 << 2
	ProtocolReplyAck            uint64 = 1 << 3
	ProtocolMTU                 uint64 = 1 << 4
	ProtocolBackendReq          uint64 = 1 << 5
	ProtocolCrossEndian         uint64 = 1 << 6
	ProtocolCryptoSession       uint64 = 1 << 7
	ProtocolPagefault           uint64 = 1 << 8
	ProtocolConfig              uint64 = 1 << 9
	ProtocolBackendSendFD       uint64 = 1 << 10
	ProtocolHostNotifier        uint64 = 1 << 11
	ProtocolInflightShmfd       uint64 = 1 << 12
	ProtocolResetDevice         uint64 = 1 << 13
	ProtocolInbandNotifications uint64 = 1 << 14
	ProtocolConfigureMemSlots   uint64 = 1 << 15
	ProtocolStatus              uint64 = 1 << 16
	ProtocolSharedObject        uint64 = 1 << 18
	ProtocolDeviceState         uint64 = 1 << 19
)

var protocolNames = []string{
	0: "MQ", 1: "LOG_SHMFD", 2: "RARP", 3: "REPLY_ACK", 4: "MTU", 5: "BACKEND_REQ",
	6: "CROSS_ENDIAN", 7: "CRYPTO_SESSION", 8: "PAGEFAULT", 9: "CONFIG",
	10: "BACKEND_SEND_FD", 11: "HOST_NOTIFIER", 12: "INFLIGHT_SHMFD", 13: "RESET_DEVICE",
	14: "INBAND_NOTIFICATIONS", 15: "CONFIGURE_MEM_SLOTS", 16: "STATUS", 17: "XEN_MMAP",
	18: "SHARED_OBJECT", 19: "DEVICE_STATE",
}

func protocolName(bit uint64) string {
	for i := range protocolNames {
		if bit == 1<<i {
			return protocolNames[i]
		}
	}
	return fmt.Sprintf("%#x", bit)
}

// Request is a front-end request code (VHOST_USER_*).
type Request uint32

// Request codes, front-end to back-end.
const (
	ReqGetFeatures         Request = 1
	ReqSetFeatures         Request = 2
	ReqSetOwner            Request = 3
	ReqResetOwner          Request = 4
	ReqSetMemTable         Request = 5
	ReqSetLogBase          Request = 6
	ReqSetLogFD            Request = 7
	ReqSetVringNum         Request = 8
	ReqSetVringAddr        Request = 9
	ReqSetVringBase        Request = 10
	ReqGetVringBase        Request = 11
	ReqSetVringKick        Request = 12
	ReqSetVringCall        Request = 13
	ReqSetVringErr         Request = 14
	ReqGetProtocolFeatures Request = 15
	ReqSetProtocolFeatures Request = 16
	ReqGetQueueNum         Request = 17
	ReqSetVringEnable      Request = 18
	ReqSendRARP            Request = 19
	ReqNetSetMTU           Request = 20
	ReqSetBackendReqFD     Request = 21
	ReqIOTLBMsg            Request = 22
	ReqSetVringEndian      Request = 23
	ReqGetConfig           Request = 24
	ReqSetConfig           Request = 25
	ReqCreateCryptoSession Request = 26
	ReqCloseCryptoSession  Request = 27
	ReqPostcopyAdvise      Request = 28
	ReqPostcopyListen      Request = 29
	ReqPostcopyEnd         Request = 30
	ReqGetInflightFD       Request = 31
	ReqSetInflightFD       Request = 32
	ReqGPUSetSocket        Request = 33
	ReqResetDevice         Request = 34
	ReqVringKick           Request = 35
	ReqGetMaxMemSlots      Request = 36
	ReqAddMemReg           Request = 37
	ReqRemMemReg           Request = 38
	ReqSetStatus           Request = 39
	ReqGetStatus           Request = 40
	ReqGetSharedObject     Request = 41
	ReqSetDeviceStateFD    Request = 42
	ReqCheckDeviceState    Request = 43

	maxRequest = ReqCheckDeviceState
)

var requestNames = [...]string{
	ReqGetFeatures: "GET_FEATURES", ReqSetFeatures: "SET_FEATURES", ReqSetOwner: "SET_OWNER",
	ReqResetOwner: "RESET_OWNER", ReqSetMemTable: "SET_MEM_TABLE", ReqSetLogBase: "SET_LOG_BASE",
	ReqSetLogFD: "SET_LOG_FD", ReqSetVringNum: "SET_VRING_NUM", ReqSetVringAddr: "SET_VRING_ADDR",
	ReqSetVringBase: "SET_VRING_BASE", ReqGetVringBase: "GET_VRING_BASE",
	ReqSetVringKick: "SET_VRING_KICK", ReqSetVringCall: "SET_VRING_CALL", ReqSetVringErr: "SET_VRING_ERR",
	ReqGetProtocolFeatures: "GET_PROTOCOL_FEATURES", ReqSetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	ReqGetQueueNum: "GET_QUEUE_NUM", ReqSetVringEnable: "SET_VRING_ENABLE", ReqSendRARP: "SEND_RARP",
	ReqNetSetMTU: "NET_SET_MTU", ReqSetBackendReqFD: "SET_BACKEND_REQ_FD", ReqIOTLBMsg: "IOTLB_MSG",
	ReqSetVringEndian: "SET_VRING_ENDIAN", ReqGetConfig: "GET_CONFIG", ReqSetConfig: "SET_CONFIG",
	ReqCreateCryptoSession: "CREATE_CRYPTO_SESSION", ReqCloseCryptoSession: "CLOSE_CRYPTO_SESSION",
	ReqPostcopyAdvise: "POSTCOPY_ADVISE", ReqPostcopyListen: "POSTCOPY_LISTEN", ReqPostcopyEnd: "POSTCOPY_END",
	ReqGetInflightFD: "GET_INFLIGHT_FD", ReqSetInflightFD: "SET_INFLIGHT_FD", ReqGPUSetSocket: "GPU_SET_SOCKET",
	ReqResetDevice: "RESET_DEVICE", ReqVringKick: "VRING_KICK", ReqGetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	ReqAddMemReg: "ADD_MEM_REG", ReqRemMemReg: "REM_MEM_REG", ReqSetStatus: "SET_STATUS",
	ReqGetStatus: "GET_STATUS", ReqGetSharedObject: "GET_SHARED_OBJECT",
	ReqSetDeviceStateFD: "SET_DEVICE_STATE_FD", ReqCheckDeviceState: "CHECK_DEVICE_STATE",
}

// String returns the wire name without the VHOST_USER_ prefix.
func (r Request) String() string {
	if r > 0 && r <= maxRequest {
		return requestNames[r]
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Header is a message header.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32 // payload length
}

// ParseHeader decodes a header from the first HeaderSize bytes of b.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: header of %d bytes", ErrProtocol, len(b))
	}
	return Header{Request: Request(ne.Uint32(b)), Flags: ne.Uint32(b[4:]), Size: ne.Uint32(b[8:])}, nil
}

// Append appends the encoded header to b.
func (h Header) Append(b []byte) []byte {
	b = ne.AppendUint32(b, uint32(h.Request))
	b = ne.AppendUint32(b, h.Flags)
	return ne.AppendUint32(b, h.Size)
}

// Payload is a decoded message payload.
type Payload interface {
	// Append appends the wire encoding to b.
	Append(b []byte) []byte
}

// Empty is the payload of requests that carry none (GET_FEATURES, SET_OWNER…).
type Empty struct{}

// Append implements Payload.
func (Empty) Append(b []byte) []byte { return b }

// U64 is a single u64 payload (features, a ring fd index, a status, a reply).
type U64 uint64

// Append implements Payload.
func (v U64) Append(b []byte) []byte { return ne.AppendUint64(b, uint64(v)) }

// Ring fd payload bits (SET_VRING_KICK/CALL/ERR).
const (
	VringIndexMask = 0xff   // bits 0-7: the ring index
	VringNoFD      = 1 << 8 // VHOST_USER_VRING_NOFD_MASK: no fd attached (polling)
	vringFDKnown   = 0x1ff  // every other bit must be zero
	vringFDInvalid = ^uint64(vringFDKnown)
)

// VringState is {u32 index, u32 num}: SET_VRING_NUM, SET_VRING_BASE,
// GET_VRING_BASE and SET_VRING_ENABLE.
type VringState struct {
	Index uint32
	Num   uint32
}

// Append implements Payload.
func (s VringState) Append(b []byte) []byte {
	return ne.AppendUint32(ne.AppendUint32(b, s.Index), s.Num)
}

// VringAddr is SET_VRING_ADDR's payload: front-end (QEMU) user addresses.
type VringAddr struct {
	Index uint32
	Flags uint32 // bit 0: VHOST_VRING_F_LOG
	Desc  guestmem.UVA
	Used  guestmem.UVA
	Avail guestmem.UVA
	Log   uint64
}

const vringAddrSize = 40

// Append implements Payload.
func (a VringAddr) Append(b []byte) []byte {
	b = ne.AppendUint32(b, a.Index)
	b = ne.AppendUint32(b, a.Flags)
	b = ne.AppendUint64(b, uint64(a.Desc))
	b = ne.AppendUint64(b, uint64(a.Used))
	b = ne.AppendUint64(b, uint64(a.Avail))
	return ne.AppendUint64(b, a.Log)
}

const regionSize = 32

func appendRegion(b []byte, r guestmem.RegionSpec) []byte {
	b = ne.AppendUint64(b, uint64(r.GPA))
	b = ne.AppendUint64(b, r.Size)
	b = ne.AppendUint64(b, uint64(r.UVA))
	return ne.AppendUint64(b, r.MmapOffset)
}

func parseRegion(p []byte) guestmem.RegionSpec {
	return guestmem.RegionSpec{
		GPA:        guestmem.GPA(ne.Uint64(p)),
		Size:       ne.Uint64(p[8:]),
		UVA:        guestmem.UVA(ne.Uint64(p[16:])),
		MmapOffset: ne.Uint64(p[24:]),
	}
}

// MemTable is SET_MEM_TABLE's payload: {u32 nregions, u32 padding,
// regions[nregions]}, one fd per region in order.
type MemTable struct {
	Regions []guestmem.RegionSpec
}

// Append implements Payload.
func (t MemTable) Append(b []byte) []byte {
	b = ne.AppendUint32(b, uint32(len(t.Regions)))
	b = ne.AppendUint32(b, 0)
	for _, r := range t.Regions {
		b = appendRegion(b, r)
	}
	return b
}

// MemRegion is ADD_MEM_REG's and REM_MEM_REG's payload: {u64 padding, region}.
type MemRegion struct {
	Region guestmem.RegionSpec
}

const memRegionSize = 8 + regionSize

// Append implements Payload.
func (m MemRegion) Append(b []byte) []byte { return appendRegion(ne.AppendUint64(b, 0), m.Region) }

// Config is GET_CONFIG's and SET_CONFIG's payload: {u32 offset, u32 size,
// u32 flags, u8 data[size]}.
type Config struct {
	Offset uint32
	Flags  uint32 // ConfigWritable or ConfigMigration
	Data   []byte // len(Data) is the size field
}

// Config flags.
const (
	ConfigWritable  = 0 // VHOST_SET_CONFIG_TYPE_FRONTEND
	ConfigMigration = 1 // VHOST_SET_CONFIG_TYPE_MIGRATION
)

const configHeaderSize = 12

// Append implements Payload.
func (c Config) Append(b []byte) []byte {
	b = ne.AppendUint32(b, c.Offset)
	b = ne.AppendUint32(b, uint32(len(c.Data)))
	b = ne.AppendUint32(b, c.Flags)
	return append(b, c.Data...)
}

// Decode decodes the payload of request req. It checks only the layout (the
// exact size a request's payload must have); the values are checked by
// Validate and by the handlers. Requests the core does not implement decode
// as an error wrapping ErrUnsupported.
func Decode(req Request, p []byte) (Payload, error) {
	exact := func(n int) error {
		if len(p) != n {
			return fmt.Errorf("%w: %s payload of %d bytes, want %d", ErrProtocol, req, len(p), n)
		}
		return nil
	}
	switch req {
	case ReqGetFeatures, ReqSetOwner, ReqResetOwner, ReqGetProtocolFeatures, ReqGetQueueNum,
		ReqResetDevice, ReqGetMaxMemSlots:
		if err := exact(0); err != nil {
			return nil, err
		}
		return Empty{}, nil
	case ReqSetFeatures, ReqSetProtocolFeatures, ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		if err := exact(8); err != nil {
			return nil, err
		}
		return U64(ne.Uint64(p)), nil
	case ReqSetVringNum, ReqSetVringBase, ReqGetVringBase, ReqSetVringEnable:
		if err := exact(8); err != nil {
			return nil, err
		}
		return VringState{Index: ne.Uint32(p), Num: ne.Uint32(p[4:])}, nil
	case ReqSetVringAddr:
		if err := exact(vringAddrSize); err != nil {
			return nil, err
		}
		return VringAddr{
			Index: ne.Uint32(p), Flags: ne.Uint32(p[4:]),
			Desc: guestmem.UVA(ne.Uint64(p[8:])), Used: guestmem.UVA(ne.Uint64(p[16:])),
			Avail: guestmem.UVA(ne.Uint64(p[24:])), Log: ne.Uint64(p[32:]),
		}, nil
	case ReqSetMemTable:
		if len(p) < 8 {
			return nil, fmt.Errorf("%w: %s payload of %d bytes, want at least 8", ErrProtocol, req, len(p))
		}
		n := ne.Uint32(p)
		if n == 0 || n > MaxMemTableRegions {
			return nil, fmt.Errorf("%w: %s with %d regions, want 1..%d", ErrProtocol, req, n, MaxMemTableRegions)
		}
		if err := exact(8 + regionSize*int(n)); err != nil {
			return nil, err
		}
		t := MemTable{Regions: make([]guestmem.RegionSpec, n)}
		for i := range t.Regions {
			t.Regions[i] = parseRegion(p[8+regionSize*i:])
		}
		return t, nil
	case ReqAddMemReg, ReqRemMemReg:
		if err := exact(memRegionSize); err != nil {
			return nil, err
		}
		return MemRegion{Region: parseRegion(p[8:])}, nil
	case ReqGetConfig, ReqSetConfig:
		if len(p) < configHeaderSize {
			return nil, fmt.Errorf("%w: %s payload of %d bytes, want at least %d", ErrProtocol, req, len(p), configHeaderSize)
		}
		size := ne.Uint32(p[4:])
		if size == 0 || size > MaxConfigSize {
			return nil, fmt.Errorf("%w: %s size %d, want 1..%d", ErrProtocol, req, size, MaxConfigSize)
		}
		if err := exact(configHeaderSize + int(size)); err != nil {
			return nil, err
		}
		return Config{Offset: ne.Uint32(p), Flags: ne.Uint32(p[8:]), Data: p[configHeaderSize:]}, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrUnsupported, req)
}
