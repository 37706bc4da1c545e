package vhosttest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"golang.org/x/sys/unix"
)

// native is the vhost-user wire order (host byte order).
var native = binary.NativeEndian

// DefaultTimeout bounds every wait of a Frontend (a reply, an interrupt).
const DefaultTimeout = 5 * time.Second

// Errors a Frontend reports about the back-end's answers.
var (
	// ErrNack: the back-end answered a REPLY_ACK request with a non-zero
	// status, or a request that has its own reply with an empty one.
	ErrNack = errors.New("vhosttest: back-end rejected the request")
	// ErrBadReply: the reply did not match the request.
	ErrBadReply = errors.New("vhosttest: malformed reply")
)

// Frontend is a fake vhost-user front-end (QEMU's role) on a real Unix
// socket. Its typed methods send well-formed messages and wait for what the
// back-end owes; Send and SendRaw send anything at all. A Frontend is safe
// for concurrent use; requests are serialised.
type Frontend struct {
	conn *net.UnixConn

	// Timeout bounds each wait for a reply (0: DefaultTimeout).
	Timeout time.Duration
	// NeedReply sets NEED_REPLY on requests without their own reply once
	// REPLY_ACK is acked, so every failure is reported synchronously
	// (default true from NewFrontend; QEMU itself sets it on few requests).
	NeedReply bool

	mu       sync.Mutex
	protocol uint64 // acked protocol features
	closed   bool
}

// NewFrontend wraps an established connection.
func NewFrontend(c *net.UnixConn) *Frontend { return &Frontend{conn: c, NeedReply: true} }

// Dial connects to a back-end listening on path.
func Dial(path string) (*Frontend, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	return NewFrontend(c), nil
}

// Pair connects a Frontend to srv over a socketpair: srv serves the other end
// on a new goroutine, and done receives ServeConn's result once the session
// has ended and freed everything.
func Pair(srv *vhost.Server) (f *Frontend, done <-chan error, err error) {
	a, b, err := SocketPair()
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan error, 1)
	go func() { ch <- srv.ServeConn(b) }()
	return NewFrontend(a), ch, nil
}

// SocketPair returns the two ends of a connected AF_UNIX stream socketpair.
func SocketPair() (*net.UnixConn, *net.UnixConn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conn := func(fd int) (*net.UnixConn, error) {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			return nil, err
		}
		return c.(*net.UnixConn), nil
	}
	a, err := conn(fds[0])
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	b, err := conn(fds[1])
	if err != nil {
		a.Close()
		return nil, nil, err
	}
	return a, b, nil
}

// Conn returns the connection.
func (f *Frontend) Conn() *net.UnixConn { return f.conn }

// Close closes the connection (the back-end sees a disconnect). Idempotent.
func (f *Frontend) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	return f.conn.Close()
}

func (f *Frontend) timeout() time.Duration {
	if f.Timeout > 0 {
		return f.Timeout
	}
	return DefaultTimeout
}

// SendRaw writes b in one sendmsg with fds attached.
func (f *Frontend) SendRaw(b []byte, fds ...int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_ = f.conn.SetWriteDeadline(time.Now().Add(f.timeout()))
	n, oobn, err := f.conn.WriteMsgUnix(b, oob, nil)
	if err == nil && (n != len(b) || oobn != len(oob)) {
		err = fmt.Errorf("vhosttest: short sendmsg (%d of %d bytes)", n, len(b))
	}
	return err
}

// Send writes one message with any flags, payload and fds; the header's
// size is the payload's length.
func (f *Frontend) Send(req vhost.Request, flags uint32, payload []byte, fds ...int) error {
	b := vhost.Header{Request: req, Flags: flags, Size: uint32(len(payload))}.Append(nil)
	return f.SendRaw(append(b, payload...), fds...)
}

// ReadReply reads one reply: its header and payload.
func (f *Frontend) ReadReply() (vhost.Header, []byte, error) {
	_ = f.conn.SetReadDeadline(time.Now().Add(f.timeout()))
	var hb [vhost.HeaderSize]byte
	if err := f.readFull(hb[:]); err != nil {
		return vhost.Header{}, nil, err
	}
	h, _ := vhost.ParseHeader(hb[:])
	if h.Size > vhost.MaxPayload {
		return h, nil, fmt.Errorf("%w: reply payload of %d bytes", ErrBadReply, h.Size)
	}
	p := make([]byte, h.Size)
	if err := f.readFull(p); err != nil {
		return h, nil, err
	}
	return h, p, nil
}

func (f *Frontend) readFull(b []byte) error {
	oob := make([]byte, unix.CmsgSpace(4*8))
	for got := 0; got < len(b); {
		n, oobn, _, _, err := f.conn.ReadMsgUnix(b[got:], oob)
		if oobn > 0 {
			// Replies never carry fds here; close any rather than leak.
			if cm, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
				for i := range cm {
					if fds, err := unix.ParseUnixRights(&cm[i]); err == nil {
						for _, fd := range fds {
							unix.Close(fd)
						}
					}
				}
			}
		}
		got += n
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("vhosttest: back-end closed the connection")
		}
	}
	return nil
}

// Call sends a well-formed request and waits for what the back-end owes: the
// reply of a request that has one (returned), or the REPLY_ACK status when
// NEED_REPLY was set. A rejection is an error wrapping ErrNack.
func (f *Frontend) Call(req vhost.Request, p vhost.Payload, fds ...int) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	flags := uint32(vhost.FlagVersion)
	ack := !req.HasReply() && f.NeedReply && f.protocol&vhost.ProtocolReplyAck != 0
	if ack {
		flags |= vhost.FlagNeedReply
	}
	var payload []byte
	if p != nil {
		payload = p.Append(nil)
	}
	if err := f.Send(req, flags, payload, fds...); err != nil {
		return nil, err
	}
	if !req.HasReply() && !ack {
		return nil, nil
	}
	h, rp, err := f.ReadReply()
	if err != nil {
		return nil, fmt.Errorf("vhosttest: waiting for %s reply: %w", req, err)
	}
	if h.Request != req || h.Flags != vhost.FlagVersion|vhost.FlagReply {
		return nil, fmt.Errorf("%w: %s answered with %s flags %#x", ErrBadReply, req, h.Request, h.Flags)
	}
	if ack {
		if len(rp) != 8 {
			return nil, fmt.Errorf("%w: %s status of %d bytes", ErrBadReply, req, len(rp))
		}
		if st := vhost.U64(native.Uint64(rp)); st != 0 {
			return nil, fmt.Errorf("%w: %s status %d", ErrNack, req, st)
		}
		return nil, nil
	}
	if len(rp) == 0 {
		return nil, fmt.Errorf("%w: %s answered with an empty reply", ErrNack, req)
	}
	return rp, nil
}

func (f *Frontend) callU64(req vhost.Request) (uint64, error) {
	p, err := f.Call(req, nil)
	if err != nil {
		return 0, err
	}
	if len(p) != 8 {
		return 0, fmt.Errorf("%w: %s reply of %d bytes", ErrBadReply, req, len(p))
	}
	return native.Uint64(p), nil
}

// GetFeatures sends GET_FEATURES.
func (f *Frontend) GetFeatures() (uint64, error) { return f.callU64(vhost.ReqGetFeatures) }

// SetFeatures sends SET_FEATURES.
func (f *Frontend) SetFeatures(v uint64) error {
	_, err := f.Call(vhost.ReqSetFeatures, vhost.U64(v))
	return err
}

// GetProtocolFeatures sends GET_PROTOCOL_FEATURES.
func (f *Frontend) GetProtocolFeatures() (uint64, error) {
	return f.callU64(vhost.ReqGetProtocolFeatures)
}

// SetProtocolFeatures sends SET_PROTOCOL_FEATURES and remembers the acked
// set (REPLY_ACK decides whether later calls wait for a status).
func (f *Frontend) SetProtocolFeatures(v uint64) error {
	if _, err := f.Call(vhost.ReqSetProtocolFeatures, vhost.U64(v)); err != nil {
		return err
	}
	f.mu.Lock()
	f.protocol = v
	f.mu.Unlock()
	return nil
}

// GetQueueNum sends GET_QUEUE_NUM.
func (f *Frontend) GetQueueNum() (uint64, error) { return f.callU64(vhost.ReqGetQueueNum) }

// GetMaxMemSlots sends GET_MAX_MEM_SLOTS.
func (f *Frontend) GetMaxMemSlots() (uint64, error) { return f.callU64(vhost.ReqGetMaxMemSlots) }

// SetOwner sends SET_OWNER.
func (f *Frontend) SetOwner() error { _, err := f.Call(vhost.ReqSetOwner, nil); return err }

// ResetDevice sends RESET_DEVICE.
func (f *Frontend) ResetDevice() error { _, err := f.Call(vhost.ReqResetDevice, nil); return err }

// SetMemTable sends SET_MEM_TABLE with one region per memory.
func (f *Frontend) SetMemTable(mems ...*GuestMemory) error {
	t := vhost.MemTable{}
	fds := make([]int, len(mems))
	for i, m := range mems {
		t.Regions = append(t.Regions, m.Spec())
		fds[i] = m.Fd()
	}
	_, err := f.Call(vhost.ReqSetMemTable, t, fds...)
	return err
}

// AddMemReg sends ADD_MEM_REG for m.
func (f *Frontend) AddMemReg(m *GuestMemory) error {
	_, err := f.Call(vhost.ReqAddMemReg, vhost.MemRegion{Region: m.Spec()}, m.Fd())
	return err
}

// RemMemReg sends REM_MEM_REG for a region.
func (f *Frontend) RemMemReg(spec guestmem.RegionSpec) error {
	_, err := f.Call(vhost.ReqRemMemReg, vhost.MemRegion{Region: spec})
	return err
}

// SetVringNum sends SET_VRING_NUM.
func (f *Frontend) SetVringNum(i int, n uint32) error {
	_, err := f.Call(vhost.ReqSetVringNum, vhost.VringState{Index: uint32(i), Num: n})
	return err
}

// SetVringBase sends SET_VRING_BASE.
func (f *Frontend) SetVringBase(i int, base uint32) error {
	_, err := f.Call(vhost.ReqSetVringBase, vhost.VringState{Index: uint32(i), Num: base})
	return err
}

// SetVringAddr sends SET_VRING_ADDR with front-end addresses.
func (f *Frontend) SetVringAddr(i int, desc, used, avail guestmem.UVA) error {
	_, err := f.Call(vhost.ReqSetVringAddr, vhost.VringAddr{Index: uint32(i), Desc: desc, Used: used, Avail: avail})
	return err
}

// GetVringBase sends GET_VRING_BASE (which stops the ring) and returns the
// back-end's next avail index.
func (f *Frontend) GetVringBase(i int) (uint16, error) {
	p, err := f.Call(vhost.ReqGetVringBase, vhost.VringState{Index: uint32(i)})
	if err != nil {
		return 0, err
	}
	pl, err := vhost.Decode(vhost.ReqGetVringBase, p)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrBadReply, err)
	}
	st := pl.(vhost.VringState)
	if st.Index != uint32(i) || st.Num > 0xffff {
		return 0, fmt.Errorf("%w: GET_VRING_BASE(%d) answered %+v", ErrBadReply, i, st)
	}
	return uint16(st.Num), nil
}

func (f *Frontend) setVringFD(req vhost.Request, i int, file *os.File) error {
	if file == nil {
		_, err := f.Call(req, vhost.U64(uint64(i)|vhost.VringNoFD))
		return err
	}
	_, err := f.Call(req, vhost.U64(uint64(i)), int(file.Fd()))
	return err
}

// SetVringKick sends SET_VRING_KICK with file's fd (nil: the NOFD flag).
func (f *Frontend) SetVringKick(i int, file *os.File) error {
	return f.setVringFD(vhost.ReqSetVringKick, i, file)
}

// SetVringCall sends SET_VRING_CALL with file's fd (nil: the NOFD flag).
func (f *Frontend) SetVringCall(i int, file *os.File) error {
	return f.setVringFD(vhost.ReqSetVringCall, i, file)
}

// SetVringErr sends SET_VRING_ERR with file's fd (nil: the NOFD flag).
func (f *Frontend) SetVringErr(i int, file *os.File) error {
	return f.setVringFD(vhost.ReqSetVringErr, i, file)
}

// SetVringEnable sends SET_VRING_ENABLE.
func (f *Frontend) SetVringEnable(i int, on bool) error {
	n := uint32(0)
	if on {
		n = 1
	}
	_, err := f.Call(vhost.ReqSetVringEnable, vhost.VringState{Index: uint32(i), Num: n})
	return err
}

// GetConfig sends GET_CONFIG and returns the bytes read.
func (f *Frontend) GetConfig(offset, size uint32) ([]byte, error) {
	p, err := f.Call(vhost.ReqGetConfig, vhost.Config{Offset: offset, Data: make([]byte, size)})
	if err != nil {
		return nil, err
	}
	pl, err := vhost.Decode(vhost.ReqGetConfig, p)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadReply, err)
	}
	c := pl.(vhost.Config)
	if c.Offset != offset || len(c.Data) != int(size) {
		return nil, fmt.Errorf("%w: GET_CONFIG(%d, %d) answered offset %d size %d", ErrBadReply, offset, size, c.Offset, len(c.Data))
	}
	return c.Data, nil
}

// SetConfig sends SET_CONFIG.
func (f *Frontend) SetConfig(offset uint32, data []byte, flags uint32) error {
	_, err := f.Call(vhost.ReqSetConfig, vhost.Config{Offset: offset, Flags: flags, Data: data})
	return err
}

// --- A whole fake device: QEMU's message sequences plus the guest driver ---

// Queue is one ring as the fake guest drives it, with the front-end's ends
// of its eventfds.
type Queue struct {
	*Ring
	Index int
	Kick  *os.File // the guest writes it to notify the device
	Call  *os.File // the device signals it (interrupt)
	Err   *os.File // the device signals it when the ring breaks
}

func newQueue(i int, r *Ring) (*Queue, error) {
	q := &Queue{Ring: r, Index: i}
	var err error
	if q.Kick, err = NewEventFD(); err == nil {
		if q.Call, err = NewEventFD(); err == nil {
			if q.Err, err = NewEventFD(); err == nil {
				return q, nil
			}
		}
	}
	q.close()
	return nil, err
}

func (q *Queue) close() {
	for _, f := range []*os.File{q.Kick, q.Call, q.Err} {
		if f != nil {
			f.Close()
		}
	}
}

// Notify kicks the device if the ring asks for it, or always when force is
// set (the kick eventfd coalesces).
func (q *Queue) Notify(force bool) error {
	if !q.NeedKick() && !force {
		return nil
	}
	return writeEventFD(q.Kick)
}

func writeEventFD(f *os.File) error {
	var one [8]byte
	native.PutUint64(one[:], 1)
	_, err := f.Write(one[:])
	return err
}

// WaitCall waits up to d for an interrupt; it reports whether one came.
func (q *Queue) WaitCall(d time.Duration) (bool, error) { return waitEventFD(q.Call, d) }

// WaitErr waits up to d for the device to signal the err eventfd.
func (q *Queue) WaitErr(d time.Duration) (bool, error) { return waitEventFD(q.Err, d) }

// ErrSignalled reports, without waiting, whether the device signalled the
// err eventfd since the last check, and consumes the signal.
func (q *Queue) ErrSignalled() bool {
	rc, err := q.Err.SyscallConn()
	if err != nil {
		return false
	}
	var b [8]byte
	n := 0
	_ = rc.Control(func(fd uintptr) { n, _ = unix.Read(int(fd), b[:]) }) // non-blocking eventfd
	return n == 8
}

func waitEventFD(f *os.File, d time.Duration) (bool, error) {
	var b [8]byte
	_ = f.SetReadDeadline(time.Now().Add(d))
	_, err := f.Read(b[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil
	}
	return err == nil, err
}

// DeviceOptions choose what a fake device negotiates and how it lays out
// memory. The zero value: 16 MiB of RAM, rings of 128 entries, every
// protocol feature offered acked, EVENT_IDX and indirect descriptors off.
type DeviceOptions struct {
	MemSize   uint64 // 0: 16 MiB
	QueueSize uint16 // 0: 128 (QEMU's vsock size)
	EventIdx  bool   // ack VIRTIO_F_RING_EVENT_IDX
	Indirect  bool   // ack VIRTIO_F_RING_INDIRECT_DESC
	AvailOdd  bool   // avail rings at 2 mod 4
	// Features are extra (device) feature bits to ack.
	Features uint64
	// Protocol, if not zero, limits the protocol features acked (to those
	// offered); with CONFIGURE_MEM_SLOTS acked, memory goes by ADD_MEM_REG.
	Protocol uint64
	// Legacy acks no PROTOCOL_FEATURES: no protocol features, no
	// SET_VRING_ENABLE; rings run once kicked.
	Legacy bool
	// ConfigSize, if not zero, makes Init read that much config space
	// (QEMU's vsock device reads 8 bytes at realize).
	ConfigSize uint32
	// Queues is the number of rings to drive (0: GET_QUEUE_NUM's answer
	// with MQ, else 1).
	Queues int
}

// Device is a fake guest device behind a Frontend: negotiated features,
// guest RAM and one Queue per ring.
type Device struct {
	F        *Frontend
	Mem      *GuestMemory
	Queues   []*Queue
	Offered  uint64 // virtio features the back-end offered
	Features uint64 // virtio features acked
	Protocol uint64 // protocol features acked
	Config   []byte // config read by Init
	opts     DeviceOptions
	bases    []uint16 // next avail index per ring for the next Start
	memAdded bool     // ADD_MEM_REG done (QEMU sends only changes later)
}

// Init runs QEMU 7.2's realize sequence (GET_FEATURES,
// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
// GET_MAX_MEM_SLOTS, SET_OWNER, GET_FEATURES, SET_VRING_CALL and
// SET_VRING_ERR per ring, GET_CONFIG) and allocates guest RAM and rings.
func (f *Frontend) Init(o DeviceOptions) (*Device, error) {
	if o.MemSize == 0 {
		o.MemSize = 16 << 20
	}
	if o.QueueSize == 0 {
		o.QueueSize = 128
	}
	d := &Device{F: f, opts: o}
	fail := func(err error) (*Device, error) { d.Close(); return nil, err }
	var err error
	if d.Offered, err = f.GetFeatures(); err != nil {
		return fail(err)
	}
	if d.Offered&vhost.FeatureProtocolFeatures == 0 {
		o.Legacy = true
	}
	queues := uint64(1)
	if !o.Legacy {
		offered, err := f.GetProtocolFeatures()
		if err != nil {
			return fail(err)
		}
		d.Protocol = offered
		if o.Protocol != 0 {
			d.Protocol &= o.Protocol
		}
		if err := f.SetProtocolFeatures(d.Protocol); err != nil {
			return fail(err)
		}
		if d.Protocol&vhost.ProtocolMQ != 0 {
			if queues, err = f.GetQueueNum(); err != nil {
				return fail(err)
			}
		}
		if d.Protocol&vhost.ProtocolConfigureMemSlots != 0 {
			if _, err := f.GetMaxMemSlots(); err != nil {
				return fail(err)
			}
		}
	}
	if o.Queues > 0 {
		queues = uint64(o.Queues)
	}
	if queues == 0 || queues > 256 {
		return fail(fmt.Errorf("%w: GET_QUEUE_NUM %d", ErrBadReply, queues))
	}
	if err := f.SetOwner(); err != nil {
		return fail(err)
	}
	if _, err := f.GetFeatures(); err != nil {
		return fail(err)
	}
	if d.Mem, err = NewGuestMemory(o.MemSize); err != nil {
		return fail(err)
	}
	for i := range int(queues) {
		r, err := NewRing(d.Mem, o.QueueSize, RingOptions{EventIdx: o.EventIdx, Indirect: o.Indirect, AvailOdd: o.AvailOdd})
		if err != nil {
			return fail(err)
		}
		q, err := newQueue(i, r)
		if err != nil {
			return fail(err)
		}
		d.Queues = append(d.Queues, q)
		if err := f.SetVringCall(i, q.Call); err != nil {
			return fail(err)
		}
		if err := f.SetVringErr(i, q.Err); err != nil {
			return fail(err)
		}
	}
	if o.ConfigSize > 0 && d.Protocol&vhost.ProtocolConfig != 0 {
		if d.Config, err = f.GetConfig(0, o.ConfigSize); err != nil {
			return fail(err)
		}
	}
	d.opts = o
	return d, nil
}

// Start runs QEMU 7.2's sequence at guest DRIVER_OK: SET_FEATURES, the
// memory table (SET_MEM_TABLE, or ADD_MEM_REG with CONFIGURE_MEM_SLOTS),
// then per ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
// SET_VRING_KICK, then SET_VRING_ENABLE(1) and SET_VRING_CALL per ring.
// Rings resume at the avail indices the last Stop returned (0 at first).
func (d *Device) Start() error {
	f, o := d.F, d.opts
	d.Features = vhost.FeatureVersion1 | o.Features
	if !o.Legacy {
		d.Features |= vhost.FeatureProtocolFeatures
	}
	if o.EventIdx {
		d.Features |= vhost.FeatureEventIdx
	}
	if o.Indirect {
		d.Features |= vhost.FeatureIndirectDesc
	}
	if err := f.SetFeatures(d.Features); err != nil {
		return err
	}
	var err error
	if d.Protocol&vhost.ProtocolConfigureMemSlots != 0 {
		if !d.memAdded {
			err = f.AddMemReg(d.Mem)
			d.memAdded = err == nil
		}
	} else {
		err = f.SetMemTable(d.Mem)
	}
	if err != nil {
		return err
	}
	for i, q := range d.Queues {
		base := uint16(0)
		if i < len(d.bases) {
			base = d.bases[i]
		}
		if err := d.SetupQueue(q, base); err != nil {
			return err
		}
	}
	if !o.Legacy {
		for _, q := range d.Queues {
			if err := f.SetVringEnable(q.Index, true); err != nil {
				return err
			}
		}
	}
	for _, q := range d.Queues {
		if err := f.SetVringCall(q.Index, q.Call); err != nil {
			return err
		}
	}
	return nil
}

// SetupQueue sends SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR and
// SET_VRING_KICK for q.
func (d *Device) SetupQueue(q *Queue, base uint16) error {
	f := d.F
	desc, avail, used := q.UVAs()
	if err := f.SetVringNum(q.Index, uint32(q.Size())); err != nil {
		return err
	}
	if err := f.SetVringBase(q.Index, uint32(base)); err != nil {
		return err
	}
	if err := f.SetVringAddr(q.Index, desc, used, avail); err != nil {
		return err
	}
	return f.SetVringKick(q.Index, q.Kick)
}

// Stop runs QEMU 7.2's stop sequence: SET_VRING_ENABLE(0) then
// GET_VRING_BASE per ring. It returns the back-end's avail indices.
func (d *Device) Stop() ([]uint16, error) {
	if !d.opts.Legacy {
		for _, q := range d.Queues {
			if err := d.F.SetVringEnable(q.Index, false); err != nil {
				return nil, err
			}
		}
	}
	bases := make([]uint16, len(d.Queues))
	for i, q := range d.Queues {
		var err error
		if bases[i], err = d.F.GetVringBase(q.Index); err != nil {
			return nil, err
		}
	}
	d.bases = bases
	return bases, nil
}

// Close frees the fake device's eventfds and guest RAM (not the Frontend).
func (d *Device) Close() {
	for _, q := range d.Queues {
		q.close()
	}
	d.Queues = nil
	if d.Mem != nil {
		d.Mem.Close()
		d.Mem = nil
	}
}

// WaitCalls waits up to d for an interrupt on any of qs and consumes those
// that came; it reports whether any did.
func WaitCalls(d time.Duration, qs ...*Queue) (bool, error) {
	pfds := make([]unix.PollFd, len(qs))
	for i, q := range qs {
		rc, err := q.Call.SyscallConn()
		if err != nil {
			return false, err
		}
		_ = rc.Control(func(fd uintptr) { pfds[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN} })
	}
	ms := int(d / time.Millisecond)
	for {
		n, err := unix.Poll(pfds, ms)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return false, err
		}
		break
	}
	for i, p := range pfds {
		if p.Revents&unix.POLLIN != 0 {
			if _, err := waitEventFD(qs[i].Call, time.Millisecond); err != nil {
				return false, err
			}
		}
	}
	return true, nil
}
