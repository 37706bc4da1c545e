package virtiofstest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtiofs"
)

// Errors.
var (
	// ErrBadReply: the device's reply does not match the request.
	ErrBadReply = errors.New("virtiofstest: malformed reply")
	// ErrTimeout: no reply within Options.Timeout.
	ErrTimeout = errors.New("virtiofstest: request timed out")
	// ErrClosed: the client was closed.
	ErrClosed = errors.New("virtiofstest: client closed")
	// ErrRingBroken: the device signalled the ring's err eventfd (it found
	// the ring corrupt and serves it no more): requests waiting on that
	// ring, and later ones, fail at once instead of timing out.
	ErrRingBroken = errors.New("virtiofstest: ring broken")
)

// Options configure a Client; the zero value is usable.
type Options struct {
	// Seg, if not zero, splits every payload (WRITE data, READ and READDIR
	// reply room) into descriptors of at most Seg bytes, as the guest
	// driver does with pages.
	Seg int
	// Indirect posts chains through indirect tables (the ring must have
	// negotiated them).
	Indirect bool
	// Timeout bounds each request; 0 means 10 s.
	Timeout time.Duration
	// Uid, Gid and Pid are the caller every request carries.
	Uid, Gid, Pid uint32
}

type key struct {
	q    int
	head uint16
}

// Client is a FUSE client on a started fake device whose ring 0 is hiprio
// and ring 1 a request ring.
type Client struct {
	hi, rq *vhosttest.Queue
	o      Options
	unique atomic.Uint64

	mu      sync.Mutex
	cond    *sync.Cond
	waiters map[key]chan vhosttest.UsedElem
	closed  bool
	err     error
	done    chan struct{}
	broken  [2]chan struct{} // closed when ring 0 or 1 signals its err eventfd
}

// New starts a client on dev (already Start-ed).
func New(dev *vhosttest.Device, o Options) (*Client, error) {
	if len(dev.Queues) < 2 {
		return nil, fmt.Errorf("virtiofstest: device has %d queues, want 2 or more", len(dev.Queues))
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	c := &Client{hi: dev.Queues[0], rq: dev.Queues[1], o: o, waiters: map[key]chan vhosttest.UsedElem{},
		done: make(chan struct{}), broken: [2]chan struct{}{make(chan struct{}), make(chan struct{})}}
	c.cond = sync.NewCond(&c.mu)
	go c.loop()
	return c, nil
}

// Close stops the reaper; calls in progress fail with ErrClosed. It does
// not touch the device. Idempotent.
func (c *Client) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.cond.Broadcast()
	c.mu.Unlock()
	<-c.done
}

func (c *Client) loop() {
	defer close(c.done)
	qs := []*vhosttest.Queue{c.hi, c.rq}
	for {
		c.mu.Lock()
		closed := c.closed
		c.mu.Unlock()
		if closed {
			return
		}
		got := false
		for i, q := range qs {
			for {
				u, ok, err := q.Used()
				if err != nil {
					c.mu.Lock()
					c.err = err
					c.mu.Unlock()
					break
				}
				if !ok {
					break
				}
				got = true
				c.mu.Lock()
				if ch, ok := c.waiters[key{i, u.Head}]; ok {
					delete(c.waiters, key{i, u.Head})
					ch <- u
				}
				c.mu.Unlock()
			}
		}
		c.mu.Lock()
		c.cond.Broadcast() // descriptors may have come free
		c.mu.Unlock()
		if !got {
			vhosttest.WaitCalls(2*time.Millisecond, qs...)
			for i, q := range qs {
				if q.ErrSignalled() {
					c.markBroken(i)
				}
			}
		}
	}
}

// markBroken fails ring i's requests (once).
func (c *Client) markBroken(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.broken[i]:
	default:
		close(c.broken[i])
	}
}

// Raw posts one chain as given (readable buffers, then writable buffers of
// the given sizes) on ring q (0 hiprio, 1 request) and waits for it to be
// used: for hostile-chain tests.
func (c *Client) Raw(q int, readable [][]byte, writable []int) (vhosttest.UsedElem, error) {
	ring := c.rq
	if q == 0 {
		ring = c.hi
	}
	ch := make(chan vhosttest.UsedElem, 1)
	deadline := time.Now().Add(c.o.Timeout)
	select {
	case <-c.broken[q]:
		return vhosttest.UsedElem{}, fmt.Errorf("%w: ring %d", ErrRingBroken, q)
	default:
	}
	c.mu.Lock()
	var head uint16
	for {
		if c.closed {
			c.mu.Unlock()
			return vhosttest.UsedElem{}, ErrClosed
		}
		if c.err != nil {
			err := c.err
			c.mu.Unlock()
			return vhosttest.UsedElem{}, err
		}
		var err error
		if c.o.Indirect {
			head, err = ring.AddIndirect(readable, writable)
		} else {
			head, err = ring.Add(readable, writable)
		}
		if err == nil {
			break
		}
		if !errors.Is(err, vhosttest.ErrRingFull) || time.Now().After(deadline) {
			c.mu.Unlock()
			return vhosttest.UsedElem{}, err
		}
		c.cond.Wait()
	}
	k := key{q, head}
	c.waiters[k] = ch
	c.mu.Unlock()
	if err := ring.Notify(false); err != nil {
		return vhosttest.UsedElem{}, err
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	broke := false
	select {
	case u := <-ch:
		return u, nil
	case <-t.C:
	case <-c.done:
	case <-c.broken[q]:
		broke = true
	}
	c.mu.Lock()
	delete(c.waiters, k)
	closed := c.closed
	c.mu.Unlock()
	select {
	case u := <-ch: // used just now
		return u, nil
	default:
	}
	switch {
	case closed:
		return vhosttest.UsedElem{}, ErrClosed
	case broke:
		return vhosttest.UsedElem{}, fmt.Errorf("%w: ring %d", ErrRingBroken, q)
	}
	return vhosttest.UsedElem{}, ErrTimeout
}

// Request describes one FUSE request for Do.
type Request struct {
	Queue   int    // 0 hiprio, 1 request ring (the default for Do)
	Opcode  uint32 // virtiofs.Op*
	NodeID  uint64
	Args    []byte // the opcode's struct after fuse_in_header (nil: none)
	Payload []byte // names, WRITE data
	OutArgs int    // size of the fixed reply struct
	OutData int    // room for variable reply data (READ, READDIR)
	NoReply bool   // FORGET: no writable part at all
}

// Reply is a decoded reply.
type Reply struct {
	Unique uint64
	Errno  syscall.Errno
	Data   []byte // everything after fuse_out_header
	Len    uint32 // the used length
}

// split cuts b into pieces of at most seg bytes (one piece if seg is 0).
func split(b []byte, seg int) [][]byte {
	if len(b) == 0 {
		return nil
	}
	if seg <= 0 {
		return [][]byte{b}
	}
	var r [][]byte
	for len(b) > seg {
		r = append(r, b[:seg])
		b = b[seg:]
	}
	return append(r, b)
}

func splitSizes(n, seg int) []int {
	if n <= 0 {
		return nil
	}
	if seg <= 0 {
		return []int{n}
	}
	var r []int
	for n > seg {
		r = append(r, seg)
		n -= seg
	}
	return append(r, n)
}

// Do sends one request and decodes its reply. A FUSE error comes back as
// Reply.Errno with a nil error.
func (c *Client) Do(r Request) (Reply, error) {
	u := c.unique.Add(2) // the Linux driver's uniques are even
	fixed := make([]byte, virtiofs.InHeaderSize+len(r.Args))
	copy(fixed[virtiofs.InHeaderSize:], r.Args)
	h := fuse.InHeader{
		Length: uint32(len(fixed) + len(r.Payload)),
		Opcode: r.Opcode,
		Unique: u,
		NodeId: r.NodeID,
		Caller: fuse.Caller{Owner: fuse.Owner{Uid: c.o.Uid, Gid: c.o.Gid}, Pid: c.o.Pid},
	}
	copy(fixed, bytesOf(&h))
	readable := append([][]byte{fixed}, split(r.Payload, c.o.Seg)...)
	var writable []int
	if !r.NoReply {
		writable = []int{virtiofs.OutHeaderSize}
		if r.OutArgs > 0 {
			writable = append(writable, r.OutArgs)
		}
		writable = append(writable, splitSizes(r.OutData, c.o.Seg)...)
	}
	e, err := c.Raw(r.Queue, readable, writable)
	if err != nil {
		return Reply{}, err
	}
	rep := Reply{Len: e.Len}
	if r.NoReply {
		if e.Len != 0 {
			return rep, fmt.Errorf("%w: %d bytes used for a request without reply", ErrBadReply, e.Len)
		}
		return rep, nil
	}
	if len(e.Data) < virtiofs.OutHeaderSize {
		return rep, fmt.Errorf("%w: %d bytes, no reply header", ErrBadReply, len(e.Data))
	}
	oh := binary.LittleEndian
	length, status, unique := oh.Uint32(e.Data[0:]), int32(oh.Uint32(e.Data[4:])), oh.Uint64(e.Data[8:])
	rep.Unique, rep.Data = unique, e.Data[virtiofs.OutHeaderSize:]
	switch {
	case length != e.Len:
		return rep, fmt.Errorf("%w: header length %d, used length %d", ErrBadReply, length, e.Len)
	case unique != u:
		return rep, fmt.Errorf("%w: unique %d, want %d", ErrBadReply, unique, u)
	case status > 0 || status < -4095:
		return rep, fmt.Errorf("%w: status %d", ErrBadReply, status)
	case status < 0:
		rep.Errno = syscall.Errno(-status)
		if length != virtiofs.OutHeaderSize {
			return rep, fmt.Errorf("%w: error reply of %d bytes", ErrBadReply, length)
		}
	}
	return rep, nil
}

// call runs a request and returns its reply data or its errno.
func (c *Client) call(r Request) ([]byte, error) {
	if r.Queue == 0 && !r.NoReply && r.Opcode != virtiofs.OpInterrupt {
		r.Queue = 1
	}
	rep, err := c.Do(r)
	if err != nil {
		return nil, err
	}
	if rep.Errno != 0 {
		return nil, rep.Errno
	}
	return rep.Data, nil
}

// bytesOf returns a copy of v's bytes (go-fuse's structs are the wire
// layout in host byte order).
func bytesOf[T any](v *T) []byte {
	b := unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
	return append([]byte(nil), b...)
}

// args returns the part of an In struct after its embedded InHeader.
func args[T any](v *T) []byte { return bytesOf(v)[virtiofs.InHeaderSize:] }

// decode fills v from the start of b; a short b is a bad reply.
func decode[T any](b []byte, v *T) error {
	dst := unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
	if len(b) < len(dst) {
		return fmt.Errorf("%w: %d reply bytes, want %d", ErrBadReply, len(b), len(dst))
	}
	copy(dst, b)
	return nil
}

func sizeOf[T any]() int {
	var v T
	return int(unsafe.Sizeof(v))
}

// Init sends FUSE_INIT as the Linux 6.1 virtiofs driver does (protocol
// 7.36, 1 MiB requests).
func (c *Client) Init() (fuse.InitOut, error) {
	in := fuse.InitIn{Major: 7, Minor: 36, MaxReadAhead: 128 << 10,
		Flags: fuse.CAP_ASYNC_READ | fuse.CAP_BIG_WRITES | fuse.CAP_MAX_PAGES | fuse.CAP_PARALLEL_DIROPS |
			fuse.CAP_READDIRPLUS | fuse.CAP_AUTO_INVAL_DATA}
	var out fuse.InitOut
	b, err := c.call(Request{Opcode: virtiofs.OpInit, Args: args(&in), OutArgs: sizeOf[fuse.InitOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return out, err
}

func name(s string) []byte { return append([]byte(s), 0) }

// Lookup looks name up in directory parent.
func (c *Client) Lookup(parent uint64, n string) (fuse.EntryOut, error) {
	var out fuse.EntryOut
	b, err := c.call(Request{Opcode: virtiofs.OpLookup, NodeID: parent, Payload: name(n), OutArgs: sizeOf[fuse.EntryOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return out, err
}

// GetAttr returns node's attributes.
func (c *Client) GetAttr(node uint64) (fuse.AttrOut, error) {
	var in fuse.GetAttrIn
	var out fuse.AttrOut
	b, err := c.call(Request{Opcode: virtiofs.OpGetAttr, NodeID: node, Args: args(&in), OutArgs: sizeOf[fuse.AttrOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return out, err
}

func (c *Client) open(op uint32, node uint64, flags uint32) (fuse.OpenOut, error) {
	in := fuse.OpenIn{Flags: flags}
	var out fuse.OpenOut
	b, err := c.call(Request{Opcode: op, NodeID: node, Args: args(&in), OutArgs: sizeOf[fuse.OpenOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return out, err
}

// Open opens a file (flags as open(2)'s, without O_CREAT).
func (c *Client) Open(node uint64, flags uint32) (fuse.OpenOut, error) {
	return c.open(virtiofs.OpOpen, node, flags)
}

// Read reads up to size bytes at off.
func (c *Client) Read(node, fh uint64, off int64, size int) ([]byte, error) {
	in := fuse.ReadIn{Fh: fh, Offset: uint64(off), Size: uint32(size)}
	return c.call(Request{Opcode: virtiofs.OpRead, NodeID: node, Args: args(&in), OutData: size})
}

// Write writes data at off and returns what the filesystem took.
func (c *Client) Write(node, fh uint64, off int64, data []byte) (int, error) {
	in := fuse.WriteIn{Fh: fh, Offset: uint64(off), Size: uint32(len(data))}
	var out fuse.WriteOut
	b, err := c.call(Request{Opcode: virtiofs.OpWrite, NodeID: node, Args: args(&in), Payload: data,
		OutArgs: sizeOf[fuse.WriteOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return int(out.Size), err
}

// Release closes a file handle.
func (c *Client) Release(node, fh uint64) error {
	in := fuse.ReleaseIn{Fh: fh}
	_, err := c.call(Request{Opcode: virtiofs.OpRelease, NodeID: node, Args: args(&in)})
	return err
}

// DirEntry is one READDIR entry (struct fuse_dirent).
type DirEntry struct {
	Ino  uint64
	Off  uint64
	Type uint32
	Name string
}

// ReadDir opens directory node, reads every entry and releases it.
func (c *Client) ReadDir(node uint64) ([]DirEntry, error) {
	oo, err := c.open(virtiofs.OpOpenDir, node, syscall.O_RDONLY)
	if err != nil {
		return nil, err
	}
	var ents []DirEntry
	var off uint64
	for range 1 << 16 { // bounded: each round returns at least one entry or stops
		in := fuse.ReadIn{Fh: oo.Fh, Offset: off, Size: 4096}
		b, err := c.call(Request{Opcode: virtiofs.OpReadDir, NodeID: node, Args: args(&in), OutData: 4096})
		if err != nil {
			return ents, err
		}
		if len(b) == 0 {
			break
		}
		for len(b) > 0 {
			if len(b) < 24 {
				return ents, fmt.Errorf("%w: dirent of %d bytes", ErrBadReply, len(b))
			}
			e := DirEntry{Ino: binary.LittleEndian.Uint64(b), Off: binary.LittleEndian.Uint64(b[8:]),
				Type: binary.LittleEndian.Uint32(b[20:])}
			n := int(binary.LittleEndian.Uint32(b[16:]))
			rec := (24 + n + 7) &^ 7
			if n > 1024 || 24+n > len(b) {
				return ents, fmt.Errorf("%w: dirent name of %d bytes in %d", ErrBadReply, n, len(b))
			}
			e.Name = string(b[24 : 24+n])
			ents = append(ents, e)
			off = e.Off
			b = b[min(rec, len(b)):]
		}
	}
	in := fuse.ReleaseIn{Fh: oo.Fh}
	_, err = c.call(Request{Opcode: virtiofs.OpReleaseDir, NodeID: node, Args: args(&in)})
	return ents, err
}

// Forget drops nlookup references to node (on hiprio, no reply).
func (c *Client) Forget(node, nlookup uint64) error {
	in := fuse.ForgetIn{Nlookup: nlookup}
	_, err := c.call(Request{Queue: 0, Opcode: virtiofs.OpForget, NodeID: node, Args: args(&in), NoReply: true})
	return err
}

// Create creates and opens name in directory parent.
func (c *Client) Create(parent uint64, n string, flags, mode uint32) (fuse.CreateOut, error) {
	in := fuse.CreateIn{Flags: flags, Mode: mode}
	var out fuse.CreateOut
	b, err := c.call(Request{Opcode: virtiofs.OpCreate, NodeID: parent, Args: args(&in), Payload: name(n),
		OutArgs: sizeOf[fuse.CreateOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return out, err
}

// Mkdir makes directory name in parent.
func (c *Client) Mkdir(parent uint64, n string, mode uint32) (fuse.EntryOut, error) {
	in := fuse.MkdirIn{Mode: mode}
	var out fuse.EntryOut
	b, err := c.call(Request{Opcode: virtiofs.OpMkdir, NodeID: parent, Args: args(&in), Payload: name(n),
		OutArgs: sizeOf[fuse.EntryOut]()})
	if err == nil {
		err = decode(b, &out)
	}
	return out, err
}
