package daemon_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"

	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/sdpback/sockfs"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtiofs"
	"github.com/vsdp/vsdp/vhost/virtiofs/virtiofstest"
)

// The fuzzed VM's fabric: the host exports a loopback echo service on
// fzHost!fzEcho, and the VM's policy allows SDP to fzHost only, so a
// fuzzed connect reaches the echo export, a closed port on the host
// (refused at once) or nothing at all (denied): everything it can dial is
// loopback or inside the daemon's own soft fabric, and answers at once.
const (
	fzHost = "10.53.0.1"
	fzVM   = "10.53.0.7"
	fzEcho = 7
)

// Fuzz programs. An input is a short program of FUSE requests, each sent
// as one descriptor chain through the fake front-end to vsdpd's socket
// filesystem. A step is a 10-byte header and two byte strings:
//
//	0     opcode (any byte: 0 and 53..254 are opcodes nothing serves; 255 is 0xffffffff)
//	1     node id selector (fzNode)
//	2     fh selector: 0 leaves the arguments alone, else their first 8 bytes
//	      (the fh of READ, WRITE, RELEASE, FLUSH, FSYNC, LSEEK…; INTERRUPT's
//	      unique) are replaced (fzFh)
//	3     flags (fz*)
//	4     header length error (int8, with fzBadLen; -128 makes it 0xffffffff)
//	5     segment size: payload and reply room split into pieces of this many bytes
//	      (0: one piece; coarser where a part would need more than fzMaxPieces)
//	6..7  reply room in bytes (little endian): a first piece of up to 16
//	      bytes (the reply header), then pieces of the segment size
//	8     length of the opcode's arguments that follow
//	9     length of the payload (names, WRITE data) that follows them; 255:
//	      all the rest of the input (up to fzMaxPayload), for long writes
const (
	fzHiprio     = 1 << iota // post on the hiprio ring
	fzNoRoom                 // no device-writable part at all
	fzBadLen                 // fuse_in_header.len off by int8(byte 4)
	fzRoot                   // caller uid 0
	fzOther                  // caller uid 2000 (not the owner of anything)
	fzLong                   // wait up to fzLongWait for the reply before the next step
	fzFixSize                // set fuse_write_in.size (args[16:20]) to the payload length
	fzSameUnique             // reuse the previous step's unique
)

const (
	fzStepHeader = 10
	fzMaxSteps   = 12
	fzMaxPayload = 4096
	fzShortWait  = 20 * time.Millisecond
	fzLongWait   = 500 * time.Millisecond
	// fzDrain bounds how long requests still parked when a program ends
	// may take to complete once its files are closed (the socket
	// filesystem's promise: closing the last file completes them).
	fzDrain = 5 * time.Second
	// fzGoroutineSlack bounds the goroutines an input may leave behind
	// (beyond the idle daemon's) once its files are closed.
	fzGoroutineSlack = 8
)

// Node selectors (byte 1): below fzNodeTable an entry of the table built
// per input; from it on the byte itself as a node id (low incarnations:
// connection directories released long ago).
const (
	fzNodeNone   = 0  // node id 0
	fzNodeRoot   = 1  // 1..5: the fixed nodes (root, tcp, tcp/clone, stats, policy)
	fzNodeTCP    = 2  //
	fzNodeClone  = 3  //
	fzNodeStats  = 4  //
	fzNodePolicy = 5  //
	fzNodeGap    = 6  // between the fixed nodes and connection nodes: never issued
	fzNodeConn   = 7  // 7..14: the input's connection directory and its files (+kind)
	fzNodeStale  = 15 // the previous input's data file (released)
	fzNodeFuture = 16 // an incarnation not issued yet
	fzNodeHuge   = 17 // 1<<63
	fzNodeMax    = 18 // ^0
	fzNodeTable  = 19 // first raw selector
)

// Connection directory kinds, as sockfs lays out node ids
// (connBase + incarnation<<3 | kind; see sdpback/sockfs doc.go).
const (
	fzKDir = iota
	fzKCtl
	fzKData
	fzKListen
	fzKLocal
	fzKRemote
	fzKStatus
	fzKStats
)

// Handle kinds the program keeps track of, for the checks on WRITE.
const (
	fzHUnknown = iota
	fzHCtl
	fzHData
	fzHText // status, stats, policy, local, remote: read-only
)

type fzStep struct {
	op      uint32
	node    byte
	fh      byte
	flags   byte
	delta   int8
	seg     byte
	room    uint16
	args    []byte
	payload []byte
}

// fzDecode splits an input into steps; a truncated last step keeps
// what is there.
func fzDecode(b []byte) []fzStep {
	var steps []fzStep
	for len(b) >= fzStepHeader && len(steps) < fzMaxSteps {
		s := fzStep{op: uint32(b[0]), node: b[1], fh: b[2], flags: b[3], delta: int8(b[4]), seg: b[5],
			room: binary.LittleEndian.Uint16(b[6:])}
		if b[0] == 0xff {
			s.op = ^uint32(0)
		}
		na, np := int(b[8]), int(b[9])
		b = b[fzStepHeader:]
		na = min(na, len(b))
		s.args, b = b[:na:na], b[na:]
		if np == 255 {
			np = fzMaxPayload
		}
		np = min(np, len(b))
		s.payload, b = b[:np:np], b[np:]
		steps = append(steps, s)
	}
	return steps
}

// fzEncode is fzDecode's inverse, for seeds.
func fzEncode(steps ...fzStep) []byte {
	var b []byte
	for _, s := range steps {
		op := byte(s.op)
		if s.op > 0xff {
			op = 0xff
		}
		np := byte(len(s.payload))
		if len(s.payload) >= 255 {
			np = 255 // the rest: a long payload must come last
		}
		b = append(b, op, s.node, s.fh, s.flags, byte(s.delta), s.seg, byte(s.room), byte(s.room>>8),
			byte(len(s.args)), np)
		b = append(b, s.args...)
		b = append(b, s.payload...)
	}
	return b
}

// fzHandle is a file handle the program holds.
type fzHandle struct {
	fh          uint64
	kind        int
	read, write bool
	released    bool // a RELEASE named it: no expectation any more
}

// fzResult is one chain's outcome.
type fzResult struct {
	u   vhosttest.UsedElem
	err error
}

// fzSent is a step in flight or done.
type fzSent struct {
	i      int
	s      fzStep
	unique uint64
	node   uint64
	room   int
	h      *fzHandle // the handle the fh selector named, if any
	nodeK  int       // the handle kind an OPEN of node would give
	done   chan fzResult
	seen   bool
}

// fzRig is the daemon and the guest's FUSE client, set up once per fuzz
// process and shared by every input.
type fzRig struct {
	d      *daemon.Daemon
	c      *virtiofstest.Client
	fixed  [fzNodeGap]uint64 // the fixed nodes' ids, by selector
	tcp    uint64            // tcp/'s node id
	clone  uint64            // tcp/clone's
	unique uint64
	stale  uint64 // the connection directory of the previous input (released)
	logs   *fzLogBuffer
	base   int // goroutines of the idle daemon
	fds    int // open fds of the idle daemon
	trace  func(format string, a ...any)
}

// fzLogBuffer collects what anything prints on the process-wide logger.
type fzLogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *fzLogBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *fzLogBuffer) take() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.b.String()
	s.b.Reset()
	return r
}

func fzServeEcho(tb testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	tb.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				// A plain copy loop: io.Copy between TCP
				// connections splices through pipes that Go
				// pools and frees only at GC, which would look
				// like leaked fds.
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				c.Close()
			}()
		}
	}()
	return ln.Addr().String()
}

func fzNewRig(f *testing.F) *fzRig {
	dir := f.TempDir()
	cfg := &daemon.Config{
		Fabric:  daemon.Fabric{Addr: fzHost},
		Exports: []daemon.ExportConfig{{Port: fzEcho, Target: fzServeEcho(f)}},
		VMs: []daemon.VMConfig{{Name: "fz", Socket: filepath.Join(dir, "vsock.sock"), FSSocket: filepath.Join(dir, "fs.sock"),
			CID: 9, Addr: fzVM, Policy: []string{"sdp " + fzHost}}},
	}
	lg := logrus.New()
	lg.SetOutput(io.Discard)
	d, err := daemon.Start(cfg, lg)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(d.Close)
	fe, err := vhosttest.Dial(cfg.VMs[0].FSSocket)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { fe.Close() })
	dev, err := fe.Init(vhosttest.DeviceOptions{MemSize: 64 << 20, QueueSize: 1024, EventIdx: true, Indirect: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(dev.Close)
	if err := dev.Start(); err != nil {
		f.Fatal(err)
	}
	c, err := virtiofstest.New(dev, virtiofstest.Options{Seg: 4096, Indirect: true, Uid: 1000, Gid: 1000, Pid: 42,
		Timeout: 2 * fzDrain})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(c.Close)
	if _, err := c.Init(); err != nil {
		f.Fatalf("FUSE_INIT: %v", err)
	}
	r := &fzRig{d: d, c: c, unique: 1 << 32, logs: &fzLogBuffer{}}
	r.fixed[fzNodeRoot] = fuse.FUSE_ROOT_ID
	for _, n := range []struct {
		sel          int
		parent, name string
	}{{fzNodeTCP, "", "tcp"}, {fzNodeStats, "", "stats"}, {fzNodePolicy, "", "policy"}, {fzNodeClone, "tcp", "clone"}} {
		parent := r.fixed[fzNodeRoot]
		if n.parent == "tcp" {
			parent = r.fixed[fzNodeTCP]
		}
		e, err := c.Lookup(parent, n.name)
		if err != nil {
			f.Fatalf("lookup %s: %v", n.name, err)
		}
		r.fixed[n.sel] = e.NodeId
	}
	r.tcp, r.clone = r.fixed[fzNodeTCP], r.fixed[fzNodeClone]
	// Go's logger is process-wide: anything the stack prints there on a
	// guest's say-so is a finding (the device exists to keep go-fuse
	// quiet), so it is collected and checked after every input.
	prev, flags := log.Writer(), log.Flags()
	log.SetOutput(r.logs)
	f.Cleanup(func() { log.SetOutput(prev); log.SetFlags(flags) })
	// One warm-up round trip through the echo export starts whatever the
	// stack starts once (per-stack goroutines, the export's first dial)
	// before the idle counts are taken.
	warm := fzEncode(
		fzWrite(fzFhCtl, "connect "+fzHost+"!"+strconv.Itoa(fzEcho), fzLong),
		fzOpen(fzNodeConn+fzKData, syscall.O_RDWR),
		fzWrite(fzFhFirstOpened, "ping", 0),
		fzRead(fzFhFirstOpened, 64, fzLong))
	if err := r.run(warm); err != nil {
		f.Fatalf("warm-up: %v", err)
	}
	r.base, r.fds = runtime.NumGoroutine(), fzCountFDs()
	return r
}

func fzCountFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return len(ents)
}

// fzFDs lists what the process's fds refer to.
func fzFDs() []string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var r []string
	for _, e := range ents {
		t, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err == nil {
			r = append(r, e.Name()+"->"+t)
		}
	}
	return r
}

// fh selectors (byte 2).
const (
	fzFhCtl         = 1 // the prelude's ctl handle (handles[0])
	fzFhFirstOpened = 2 // the first handle a step opened (handles[1])
	fzFhRaw         = 0x80
)

// Seed helpers.

func fzLE32(vs ...uint32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint32(b[4*i:], v)
	}
	return b
}

// fzWriteIn is fuse_write_in's 40 bytes after the header (fh patched by the selector).
func fzWriteIn(size uint32) []byte {
	return append(make([]byte, 16), append(fzLE32(size, 0), make([]byte, 16)...)...)
}

// fzReadIn is fuse_read_in's 40 bytes after the header.
func fzReadIn(size uint32) []byte {
	return append(make([]byte, 16), append(fzLE32(size), make([]byte, 20)...)...)
}

// fzRoom is reply room enough for every fixed reply struct.
const fzRoom = 16 + 256

func fzWrite(fh byte, data string, flags byte) fzStep {
	return fzStep{op: virtiofs.OpWrite, fh: fh, flags: flags | fzFixSize, room: 16 + 8, args: fzWriteIn(0), payload: []byte(data)}
}

func fzRead(fh byte, size uint16, flags byte) fzStep {
	return fzStep{op: virtiofs.OpRead, fh: fh, flags: flags, room: 16 + size, args: fzReadIn(uint32(size))}
}

func fzOpen(node byte, flags uint32) fzStep {
	return fzStep{op: virtiofs.OpOpen, node: node, room: fzRoom, args: fzLE32(flags, 0)}
}

func fzOp(op uint32, node byte, args []byte, payload string) fzStep {
	return fzStep{op: op, node: node, room: fzRoom, args: args, payload: []byte(payload)}
}

func fzWith(s fzStep, flags byte) fzStep { s.flags |= flags; return s }

// FuzzSocketFS drives vsdpd's socket filesystem — the real stack: the
// daemon's vhost-user-fs socket, the virtio-fs device, go-fuse's protocol
// server, sockfs and sdpback's file streams on the soft provider — with
// fuzzed FUSE requests posted as descriptor chains by the fake front-end:
// any opcode (unknown ones too), node ids issued (the input's own
// connection directory, cloned first), released or never issued, file
// handles opened by earlier steps or never issued, header lengths that lie,
// arguments and payloads of any size, split over descriptors, with any
// reply room, on either ring, from the owner, root or a stranger. ctl
// commands, data and writes to read-only files come from the payloads.
//
// After each step's reply: it is well-formed (used length within the room,
// a header whose length is the used length and whose unique is the
// request's, a status that is 0 or an errno, error replies of 16 bytes; no
// reply to a well-formed FORGET; a reply to everything else that has
// room), a WRITE to a read-only handle gets EBADF, a malformed ctl write
// gets EINVAL. After each input, once its files are closed: every parked
// request completes within fzDrain (no hang), the device still serves (a
// LOOKUP of tcp), tcp/ lists only clone, the VM has no stream or listener
// left, goroutines and fds are back to the idle daemon's (goroutines
// within fzGoroutineSlack), and nothing was printed on Go's process-wide
// logger. The daemon is set up once per fuzz process.
func FuzzSocketFS(f *testing.F) {
	for _, seed := range fzSeeds() {
		f.Add(seed)
	}
	r := fzNewRig(f)
	f.Fuzz(func(t *testing.T, prog []byte) {
		if os.Getenv("VSDP_FZTRACE") != "" {
			r.trace = t.Logf
			defer func() { r.trace = nil }()
		}
		if err := r.run(prog); err != nil {
			t.Fatal(err)
		}
	})
}

// run runs one program and the checks after it.
func (r *fzRig) run(prog []byte) error {
	c := r.c
	// Prelude: the input's own connection directory, tcp/N, through its
	// ctl handle.
	ctl, err := c.Open(r.clone, syscall.O_RDWR)
	if err != nil {
		return fmt.Errorf("prelude: open tcp/clone: %w", err)
	}
	handles := []*fzHandle{{fh: ctl.Fh, kind: fzHCtl, read: true, write: true}}
	b, err := c.Read(r.clone, ctl.Fh, 0, 64)
	if err != nil {
		return fmt.Errorf("prelude: read ctl: %w", err)
	}
	num := strings.TrimSpace(string(b))
	de, err := c.Lookup(r.tcp, num)
	if err != nil {
		return fmt.Errorf("prelude: lookup tcp/%s: %w", num, err)
	}
	dir := de.NodeId
	stale := r.stale
	if stale == 0 {
		stale = dir + 1<<20 // never issued on the first input
	}
	r.stale = dir
	var nodes [fzNodeTable]uint64
	copy(nodes[:], r.fixed[:])
	nodes[fzNodeGap] = 6 // sockfs's first unused id below its connection nodes
	for k := range 8 {
		nodes[fzNodeConn+k] = dir | uint64(k)
	}
	nodes[fzNodeStale] = stale | fzKData
	nodes[fzNodeFuture] = dir + 1000<<3 | fzKCtl
	nodes[fzNodeHuge] = 1 << 63
	nodes[fzNodeMax] = ^uint64(0)

	var sent []*fzSent
	var failures []string
	fail := func(format string, a ...any) { failures = append(failures, fmt.Sprintf(format, a...)) }
	reinit := false
	for i, s := range fzDecode(prog) {
		q := &fzSent{i: i, s: s, done: make(chan fzResult, 1)}
		if s.flags&fzSameUnique != 0 && len(sent) > 0 {
			q.unique = sent[len(sent)-1].unique
		} else {
			r.unique += 2
			q.unique = r.unique
		}
		if int(s.node) < fzNodeTable {
			q.node = nodes[s.node]
		} else {
			q.node = uint64(s.node)
		}
		q.nodeK = fzOpenKind(s.node)
		args := slices.Clone(s.args)
		if s.fh != 0 && len(args) >= 8 {
			var v uint64
			switch {
			case s.op == virtiofs.OpInterrupt:
				if len(sent) > 0 {
					v = sent[int(s.fh-1)%len(sent)].unique
				}
			case s.fh < fzFhRaw:
				q.h = handles[int(s.fh-1)%len(handles)]
				v = q.h.fh
			default:
				v = 1<<40 + uint64(s.fh) // never issued
			}
			binary.LittleEndian.PutUint64(args, v)
		}
		if s.flags&fzFixSize != 0 && len(args) >= 20 {
			binary.LittleEndian.PutUint32(args[16:], uint32(len(s.payload)))
		}
		if s.op == virtiofs.OpRelease && q.h != nil {
			q.h.released = true
		}
		if s.op == virtiofs.OpInit {
			reinit = true
		}
		uid := uint32(1000)
		switch {
		case s.flags&fzRoot != 0:
			uid = 0
		case s.flags&fzOther != 0:
			uid = 2000
		}
		length := virtiofs.InHeaderSize + len(args) + len(s.payload)
		if s.flags&fzBadLen != 0 {
			if s.delta == -128 {
				length = 0xffffffff
			} else {
				length += int(s.delta)
			}
		}
		h := fuse.InHeader{Length: uint32(length), Opcode: s.op, Unique: q.unique, NodeId: q.node,
			Caller: fuse.Caller{Owner: fuse.Owner{Uid: uid, Gid: uid}, Pid: 42}}
		fixed := append(fzHeader(&h), args...)
		readable := append([][]byte{fixed}, fzSplit(s.payload, fzSeg(len(s.payload), s.seg))...)
		var writable []int
		if s.flags&fzNoRoom == 0 {
			q.room = int(s.room)
			rest := q.room - virtiofs.OutHeaderSize
			writable = append([]int{min(q.room, virtiofs.OutHeaderSize)}, fzSizes(rest, fzSeg(rest, s.seg))...)
			if q.room == 0 {
				writable = nil
			}
		}
		ring := 1
		if s.flags&fzHiprio != 0 {
			ring = 0
		}
		go func() {
			u, err := c.Raw(ring, readable, writable)
			q.done <- fzResult{u, err}
		}()
		sent = append(sent, q)
		wait := fzShortWait
		if s.flags&fzLong != 0 {
			wait = fzLongWait
		}
		select {
		case res := <-q.done:
			q.seen = true
			if h := r.check(q, res, fail); h != nil {
				handles = append(handles, h)
			}
		case <-time.After(wait): // parked: completed by the close below
		}
	}

	// Close every file the program holds; that must complete whatever is
	// still parked (reads, writes, connects, listen opens).
	deadline := time.Now().Add(fzDrain)
	closed := map[uint64]bool{}
	for {
		for _, h := range handles {
			if !closed[h.fh] {
				closed[h.fh] = true
				if err := c.Release(r.clone, h.fh); err != nil {
					fail("release fh %d: %v", h.fh, err)
				}
			}
		}
		more := false
		for _, q := range sent {
			if q.seen {
				continue
			}
			var res fzResult
			select {
			case res = <-q.done:
			default:
				select {
				case res = <-q.done:
				case <-time.After(time.Until(deadline)):
					fail("step %d (opcode %d, node %#x) still parked %v after its files were closed: a hang",
						q.i, q.s.op, q.node, fzDrain)
					q.seen = true
					continue
				}
			}
			q.seen = true
			if h := r.check(q, res, fail); h != nil {
				handles = append(handles, h)
				more = true
			}
		}
		if !more {
			break
		}
	}
	if reinit {
		if _, err := c.Init(); err != nil {
			fail("FUSE_INIT after the program's own: %v", err)
		}
	}
	if len(failures) > 0 {
		return fmt.Errorf("%s", strings.Join(failures, "\n"))
	}
	return r.idle()
}

// idle checks the daemon is serving and back to idle.
func (r *fzRig) idle() error {
	if _, err := r.c.Lookup(fuse.FUSE_ROOT_ID, "tcp"); err != nil {
		return fmt.Errorf("device no longer serving: lookup tcp: %w", err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		var why []string
		ents, err := r.c.ReadDir(r.tcp)
		if err != nil {
			return fmt.Errorf("readdir tcp: %w", err)
		}
		for _, e := range ents {
			if e.Name != "." && e.Name != ".." && e.Name != "clone" {
				why = append(why, "tcp/"+e.Name+" still exists after its files were closed")
			}
		}
		if st := r.d.VMs()[0].Back.Stats(); st.Streams != 0 || st.Listeners != 0 {
			why = append(why, fmt.Sprintf("%d streams and %d listeners left", st.Streams, st.Listeners))
		}
		if r.base > 0 {
			if g := runtime.NumGoroutine(); g > r.base+fzGoroutineSlack {
				why = append(why, fmt.Sprintf("%d goroutines, idle daemon had %d", g, r.base))
			}
			if n := fzCountFDs(); n > r.fds {
				why = append(why, fmt.Sprintf("%d fds open, idle daemon had %d: %v", n, r.fds, fzFDs()))
			}
		}
		if len(why) == 0 {
			break
		}
		if r.trace != nil {
			r.trace("not idle yet: %s", strings.Join(why, "; "))
		}
		if time.Now().After(deadline) {
			if r.base > 0 && runtime.NumGoroutine() > r.base+fzGoroutineSlack {
				buf := make([]byte, 1<<20)
				why = append(why, string(buf[:runtime.Stack(buf, true)]))
			}
			return fmt.Errorf("not idle after the program: %s", strings.Join(why, "; "))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if s := r.logs.take(); s != "" {
		return fmt.Errorf("printed on the process-wide logger: %q", s)
	}
	return nil
}

// fzOpenKind is the kind of handle an OPEN of node selector sel gives.
func fzOpenKind(sel byte) int {
	switch {
	case sel == fzNodeClone, sel == fzNodeConn+fzKCtl:
		return fzHCtl
	case sel == fzNodeConn+fzKData:
		return fzHData
	case sel == fzNodeStats, sel == fzNodePolicy, sel >= fzNodeConn+fzKLocal && sel <= fzNodeConn+fzKStats:
		return fzHText
	}
	return fzHUnknown
}

// check validates one reply and returns the handle an OPEN opened.
func (r *fzRig) check(q *fzSent, res fzResult, fail func(string, ...any)) *fzHandle {
	s := q.s
	if res.err != nil {
		fail("step %d (opcode %d): %v", q.i, s.op, res.err)
		return nil
	}
	u := res.u
	n := int(u.Len)
	wellFormed := s.flags&(fzBadLen|fzHiprio|fzNoRoom) == 0 // on the request ring, length true
	switch {
	case n > q.room:
		fail("step %d (opcode %d): used length %d with %d bytes of room", q.i, s.op, n, q.room)
		return nil
	case n == 0:
		hi := s.op == virtiofs.OpForget || s.op == virtiofs.OpBatchForget || s.op == virtiofs.OpInterrupt
		if q.room >= virtiofs.OutHeaderSize && !hi {
			fail("step %d (opcode %d): no reply with %d bytes of room", q.i, s.op, q.room)
		}
		return nil
	case n < virtiofs.OutHeaderSize:
		fail("step %d (opcode %d): used length %d, shorter than a reply header", q.i, s.op, n)
		return nil
	case len(u.Data) < n:
		fail("step %d: %d bytes of reply data for used length %d", q.i, len(u.Data), n)
		return nil
	}
	le := binary.LittleEndian
	length, st, unique := le.Uint32(u.Data), int32(le.Uint32(u.Data[4:])), le.Uint64(u.Data[8:])
	switch {
	case int(length) != n:
		fail("step %d (opcode %d): reply header length %d, used length %d", q.i, s.op, length, n)
		return nil
	case unique != q.unique:
		fail("step %d (opcode %d): reply unique %d, sent %d", q.i, s.op, unique, q.unique)
		return nil
	case st > 0 || st < -4095:
		fail("step %d (opcode %d): reply status %d", q.i, s.op, st)
		return nil
	case st < 0 && n != virtiofs.OutHeaderSize:
		fail("step %d (opcode %d): error reply of %d bytes", q.i, s.op, n)
		return nil
	}
	errno := syscall.Errno(-st)
	data := u.Data[virtiofs.OutHeaderSize:n]
	if r.trace != nil {
		r.trace("step %d op %d node %#x: errno %d (%v), %d bytes", q.i, s.op, q.node, errno, errno, len(data))
	}
	if (s.op == virtiofs.OpForget && len(s.args) >= 8 || s.op == virtiofs.OpBatchForget && len(s.args) >= 8) &&
		s.flags&fzBadLen == 0 {
		fail("step %d: a well-formed FORGET got a reply (status %d)", q.i, st)
	}
	switch s.op {
	case virtiofs.OpOpen:
		if errno != 0 || len(data) < 8 {
			return nil
		}
		h := &fzHandle{fh: le.Uint64(data), kind: q.nodeK}
		if int(s.node) >= fzNodeTable || q.nodeK == fzHUnknown && s.node != fzNodeConn+fzKListen {
			h.kind = fzHUnknown
		}
		if len(s.args) >= 4 {
			switch le.Uint32(s.args) & syscall.O_ACCMODE {
			case syscall.O_RDONLY:
				h.read = true
			case syscall.O_WRONLY:
				h.write = true
			case syscall.O_RDWR:
				h.read, h.write = true, true
			}
		}
		if s.node == fzNodeConn+fzKListen {
			h.kind = fzHCtl // an accepted call's ctl
		}
		return h
	case virtiofs.OpWrite:
		h := q.h
		if !wellFormed || h == nil || h.released || h.kind == fzHUnknown || s.flags&fzFixSize == 0 ||
			len(s.args) < 40 || q.room < virtiofs.OutHeaderSize+8 {
			return nil
		}
		switch {
		case !h.write || h.kind == fzHText:
			if errno != syscall.EBADF {
				fail("step %d: WRITE to a read-only handle (kind %d): errno %v, want EBADF", q.i, h.kind, errno)
			}
		case h.kind == fzHCtl && len(s.payload) > sockfs.MaxCtl:
			if errno != syscall.EINVAL {
				fail("step %d: a %d-byte ctl write: errno %v, want EINVAL", q.i, len(s.payload), errno)
			}
		case h.kind == fzHCtl:
			if _, err := sockfs.ParseCmd(s.payload); err != nil && errno != syscall.EINVAL {
				fail("step %d: malformed ctl write %q: errno %v, want EINVAL", q.i, s.payload, errno)
			}
		}
	}
	return nil
}

func fzHeader(h *fuse.InHeader) []byte {
	b := make([]byte, virtiofs.InHeaderSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], h.Length)
	le.PutUint32(b[4:], h.Opcode)
	le.PutUint64(b[8:], h.Unique)
	le.PutUint64(b[16:], h.NodeId)
	le.PutUint32(b[24:], h.Uid)
	le.PutUint32(b[28:], h.Gid)
	le.PutUint32(b[32:], h.Pid)
	return b
}

// fzMaxPieces bounds the descriptors of each part of a chain, so that a
// chain stays within the queue size (1024) as the virtio spec asks of a
// driver (chains beyond it are virtq's fuzz targets' business, not this
// one's).
const fzMaxPieces = 500

// fzSeg is the segment size for n bytes: seg, or coarser so that n splits
// into at most fzMaxPieces pieces (0: one piece).
func fzSeg(n int, seg byte) int {
	if seg == 0 {
		return 0
	}
	return max(int(seg), (n+fzMaxPieces-1)/fzMaxPieces)
}

// fzSplit cuts b into pieces of n bytes (n 0: one piece; empty b: none).
func fzSplit(b []byte, n int) [][]byte {
	if len(b) == 0 {
		return nil
	}
	if n <= 0 {
		return [][]byte{b}
	}
	var r [][]byte
	for len(b) > n {
		r = append(r, b[:n])
		b = b[n:]
	}
	return append(r, b)
}

func fzSizes(total, n int) []int {
	if total <= 0 {
		return nil
	}
	if n <= 0 {
		return []int{total}
	}
	var r []int
	for total > n {
		r = append(r, n)
		total -= n
	}
	return append(r, total)
}

// fzSeeds are the seed programs (the committed corpus in
// testdata/fuzz/FuzzSocketFS holds the same, and a few more).
func fzSeeds() [][]byte {
	echo := "connect " + fzHost + "!" + strconv.Itoa(fzEcho)
	name := func(s string) string { return s + "\x00" }
	forget := fzLE32(1, 0) // nlookup 1
	return [][]byte{
		// A connection to the echo export: data both ways, then a read
		// that parks until the close.
		fzEncode(
			fzWrite(fzFhCtl, echo, fzLong),
			fzOpen(fzNodeConn+fzKData, syscall.O_RDWR),
			fzWrite(fzFhFirstOpened, "hello", 0),
			fzRead(fzFhFirstOpened, 64, fzLong),
			fzRead(fzFhFirstOpened, 64, 0),
			fzOp(virtiofs.OpOpen, fzNodeConn+fzKStats, fzLE32(syscall.O_RDONLY, 0), ""),
			fzRead(3, 512, 0)),
		// ctl commands, good and bad: EINVAL, a refused port, a denied
		// destination, and commands after a hangup.
		fzEncode(
			fzWrite(fzFhCtl, "frobnicate", 0),
			fzWrite(fzFhCtl, "connect", 0),
			fzWrite(fzFhCtl, "connect "+fzHost+"!99999", 0),
			fzWrite(fzFhCtl, "", 0),
			fzWrite(fzFhCtl, "keepalive 99999999", 0),
			fzWrite(fzFhCtl, "nodelay maybe\n", 0),
			fzWrite(fzFhCtl, "connect "+fzHost+"!9", fzLong),
			fzOpen(fzNodeClone, syscall.O_RDWR),
			fzWrite(fzFhFirstOpened, "connect 10.99.0.1!80", fzLong),
			fzWrite(fzFhCtl, "hangup", 0),
			fzWrite(fzFhCtl, echo, fzLong),
			fzWrite(fzFhCtl, "connect "+strings.Repeat("1", 300), 0)),
		// Read-only files: opened for reading, written to (EBADF); opened
		// for writing (EACCES, or allowed to root and then EBADF).
		fzEncode(
			fzOpen(fzNodeConn+fzKStatus, syscall.O_RDONLY),
			fzWrite(fzFhFirstOpened, "x", 0),
			fzOpen(fzNodeStats, syscall.O_RDWR),
			fzOpen(fzNodePolicy, syscall.O_WRONLY),
			fzWith(fzOpen(fzNodeStats, syscall.O_RDWR), fzRoot),
			fzWrite(3, "stats", 0),
			fzOpen(fzNodePolicy, syscall.O_RDONLY),
			fzWrite(4, "sdp 0.0.0.0/0", 0),
			fzRead(4, 256, 0),
			fzOpen(fzNodeConn+fzKLocal, syscall.O_WRONLY),
			fzOpen(fzNodeConn+fzKRemote, syscall.O_RDONLY|syscall.O_APPEND),
			fzOpen(fzNodeConn+fzKCtl, 3)),
		// announce, a listen open that parks, an INTERRUPT for it, and
		// a second announce of the same port.
		fzEncode(
			fzWrite(fzFhCtl, "announce *!0", fzLong),
			fzOpen(fzNodeConn+fzKListen, syscall.O_RDWR),
			fzStep{op: virtiofs.OpInterrupt, fh: 2, flags: fzHiprio, room: 16, args: make([]byte, 8)},
			fzOpen(fzNodeClone, syscall.O_RDWR),
			fzWrite(2, "announce "+fzVM+"!5000", fzLong),
			fzWrite(2, "announce "+fzVM+"!5000", 0),
			fzRead(fzFhCtl, 16, 0)),
		// Opcodes nothing serves, and ones sockfs does not implement.
		fzEncode(
			fzOp(0, fzNodeRoot, nil, ""),
			fzOp(7, fzNodeRoot, make([]byte, 16), ""),
			fzOp(19, fzNodeConn+fzKData, make([]byte, 16), ""),
			fzOp(53, fzNodeTCP, nil, ""),
			fzOp(0xfe, fzNodeMax, nil, ""),
			fzOp(0xffffffff, fzNodeRoot, nil, ""),
			fzOp(virtiofs.OpMkdir, fzNodeTCP, make([]byte, 8), name("x")),
			fzOp(virtiofs.OpSymlink, fzNodeTCP, nil, name("a")+name("b")),
			fzOp(virtiofs.OpIoctl, fzNodeConn+fzKData, make([]byte, 32), ""),
			fzOp(virtiofs.OpSetupMapping, fzNodeRoot, make([]byte, 40), "")),
		// Lengths that lie, too little room, the wrong ring.
		fzEncode(
			fzStep{op: virtiofs.OpLookup, node: fzNodeRoot, flags: fzBadLen, delta: -3, room: fzRoom, payload: []byte(name("tcp"))},
			fzStep{op: virtiofs.OpLookup, node: fzNodeRoot, flags: fzBadLen, delta: 5, room: fzRoom, payload: []byte(name("tcp"))},
			fzStep{op: virtiofs.OpLookup, node: fzNodeRoot, flags: fzBadLen, delta: -128, room: fzRoom, payload: []byte(name("tcp"))},
			fzOp(virtiofs.OpGetAttr, fzNodeRoot, make([]byte, 4), ""),
			fzStep{op: virtiofs.OpWrite, fh: fzFhCtl, room: 24, args: fzWriteIn(100), payload: []byte("hangup")},
			fzStep{op: virtiofs.OpLookup, node: fzNodeTCP, flags: fzNoRoom, payload: []byte(name("clone"))},
			fzStep{op: virtiofs.OpLookup, node: fzNodeTCP, room: 10, payload: []byte(name("clone"))},
			fzStep{op: virtiofs.OpLookup, node: fzNodeTCP, flags: fzHiprio, room: fzRoom, payload: []byte(name("clone"))},
			fzStep{op: virtiofs.OpForget, node: fzNodeConn, room: fzRoom, args: forget},
			fzStep{op: virtiofs.OpForget, node: fzNodeConn, flags: fzHiprio | fzNoRoom, args: forget},
			fzStep{op: virtiofs.OpBatchForget, flags: fzHiprio, room: 16, args: fzLE32(5, 0), payload: make([]byte, 16)},
			fzStep{op: virtiofs.OpRead, fh: fzFhCtl, room: 20, args: fzReadIn(4096), seg: 3}),
		// Node ids and handles never issued, or released.
		fzEncode(
			fzOp(virtiofs.OpGetAttr, fzNodeGap, make([]byte, 16), ""),
			fzOp(virtiofs.OpGetAttr, fzNodeStale, make([]byte, 16), ""),
			fzOp(virtiofs.OpGetAttr, fzNodeFuture, make([]byte, 16), ""),
			fzOp(virtiofs.OpGetAttr, fzNodeHuge, make([]byte, 16), ""),
			fzOpen(fzNodeFuture, syscall.O_RDWR),
			fzOpen(fzNodeStale, syscall.O_RDWR),
			fzOp(virtiofs.OpLookup, fzNodeStale, nil, name("ctl")),
			fzOp(virtiofs.OpLookup, fzNodeTable+5, nil, name("data")),
			fzRead(0x90, 64, 0),
			fzWrite(0x91, "connect "+fzHost+"!7", 0),
			fzStep{op: virtiofs.OpRelease, fh: 0xfe, room: 16, args: make([]byte, 24)},
			fzStep{op: virtiofs.OpReadDir, node: fzNodeFuture, room: 16 + 4096, args: fzReadIn(4096)}),
		// Session and directory operations, a stranger and root.
		fzEncode(
			fzOp(virtiofs.OpInit, 0, fzLE32(7, 12, 0, 0), ""),
			fzOp(virtiofs.OpInit, 0, fzLE32(8, 36, 0, 0), ""),
			fzOp(virtiofs.OpStatFS, fzNodeRoot, nil, ""),
			fzOp(virtiofs.OpOpenDir, fzNodeConn, fzLE32(0, 0), ""),
			fzStep{op: virtiofs.OpReadDir, node: fzNodeConn, room: 4096, args: fzReadIn(4000)},
			fzStep{op: virtiofs.OpReadDirPlus, node: fzNodeTCP, room: 4096, seg: 100, args: fzReadIn(4000)},
			fzOp(virtiofs.OpSetAttr, fzNodeConn+fzKCtl, make([]byte, 88), ""),
			fzOp(virtiofs.OpAccess, fzNodeConn+fzKData, fzLE32(7, 0), ""),
			fzWith(fzOp(virtiofs.OpLookup, fzNodeTCP, nil, "0\x00"), fzOther),
			fzWith(fzOpen(fzNodeConn+fzKCtl, syscall.O_RDWR), fzOther),
			fzWith(fzOp(virtiofs.OpOpenDir, fzNodeConn, fzLE32(0, 0), ""), fzOther),
			fzOp(virtiofs.OpDestroy, 0, nil, "")),
		// Closing the ctl mid-program, then using the connection.
		fzEncode(
			fzOpen(fzNodeConn+fzKData, syscall.O_RDWR),
			fzRead(fzFhFirstOpened, 64, 0),
			fzWrite(fzFhFirstOpened, "early", 0),
			fzStep{op: virtiofs.OpRelease, fh: fzFhCtl, room: 16, args: make([]byte, 24)},
			fzWrite(fzFhCtl, echo, 0),
			fzStep{op: virtiofs.OpRelease, fh: fzFhFirstOpened, room: 16, args: make([]byte, 24)},
			fzOp(virtiofs.OpGetAttr, fzNodeConn, make([]byte, 16), ""),
			fzRead(fzFhFirstOpened, 64, 0),
			fzWith(fzRead(fzFhFirstOpened, 64, 0), fzSameUnique)),
		// A long ctl write (past MaxCtl) split over descriptors.
		fzEncode(
			fzWith(fzStep{op: virtiofs.OpWrite, fh: fzFhCtl, room: 24, seg: 7, args: fzWriteIn(0),
				payload: []byte("connect " + strings.Repeat("9", 400))}, fzFixSize)),
	}
}
