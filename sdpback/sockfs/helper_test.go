package sockfs_test

import (
	"context"
	"encoding/binary"
	"io"
	"net/netip"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/internal/fabric"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/sdpback/sockfs"
)

var (
	hostAddr = netip.MustParseAddr("10.9.0.1") // exports host services
	vmAddr   = netip.MustParseAddr("10.9.0.10")
	peerAddr = netip.MustParseAddr("10.9.0.20") // a remote SDP host
)

// world is a soft fabric with three stacks (host exports, the VM, a
// remote peer), the VM's host side and its socket filesystem.
type world struct {
	t                  testing.TB
	host, vmSt, peerSt *sdp.Stack
	vm                 *sdpback.VM
	fs                 *sockfs.FS
}

func newWorld(t testing.TB, policy sdpback.Policy, opts sockfs.Options) *world {
	t.Helper()
	st := fabric.Stacks(t,
		fabric.Host{Name: "host", Addr: hostAddr}, fabric.Host{Name: "vm", Addr: vmAddr}, fabric.Host{Name: "peer", Addr: peerAddr})
	w := &world{t: t, host: st[0], vmSt: st[1], peerSt: st[2]}
	w.vm = sdpback.NewVM(sdpback.VMConfig{Name: "vm1", Addr: vmAddr, Policy: policy, DialTimeout: 3 * time.Second}, w.vmSt, nil)
	w.fs = sockfs.New(w.vm, opts)
	t.Cleanup(func() { // before the stacks close
		w.fs.Close()
		w.vm.Close()
	})
	return w
}

func rule(t testing.TB, s string) sdpback.Rule {
	r, err := sdpback.ParseRule(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// noLeaks fails the test if goroutines started during it outlive it. Call
// it first, so its cleanup runs last.
func noLeaks(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<20)
			t.Errorf("%d goroutines leaked:\n%s", n-before, buf[:runtime.Stack(buf, true)])
		}
	})
}

// client drives the RawFileSystem as the guest kernel would, as one uid.
type client struct {
	t      testing.TB
	fs     fuse.RawFileSystem
	caller fuse.Caller
}

func (w *world) as(uid uint32) *client {
	return &client{t: w.t, fs: w.fs.RawFS(), caller: fuse.Caller{Owner: fuse.Owner{Uid: uid, Gid: uid}, Pid: 100 + uid}}
}

func (c *client) hdr(node uint64) fuse.InHeader { return fuse.InHeader{NodeId: node, Caller: c.caller} }

// lookup walks path from the root.
func (c *client) lookup(path string) (uint64, fuse.Attr, syscall.Errno) {
	node := uint64(fuse.FUSE_ROOT_ID)
	var out fuse.EntryOut
	for _, name := range strings.Split(path, "/") {
		h := c.hdr(node)
		out = fuse.EntryOut{}
		if st := c.fs.Lookup(nil, &h, name, &out); st != fuse.OK {
			return 0, fuse.Attr{}, syscall.Errno(st)
		}
		if out.EntryValid != 0 || out.AttrValid != 0 || out.EntryValidNsec != 0 || out.AttrValidNsec != 0 {
			c.t.Errorf("lookup %s: non-zero timeouts %+v", path, out)
		}
		node = out.NodeId
	}
	return node, out.Attr, 0
}

// file is an open file.
type file struct {
	c        *client
	node, fh uint64
	off      uint64
}

func (c *client) openNode(node uint64, flags uint32) (*file, syscall.Errno) {
	in := fuse.OpenIn{InHeader: c.hdr(node), Flags: flags}
	var out fuse.OpenOut
	if st := c.fs.Open(nil, &in, &out); st != fuse.OK {
		return nil, syscall.Errno(st)
	}
	if out.OpenFlags&(fuse.FOPEN_DIRECT_IO|fuse.FOPEN_NONSEEKABLE) != fuse.FOPEN_DIRECT_IO|fuse.FOPEN_NONSEEKABLE {
		c.t.Errorf("open flags %#x lack direct I/O or non-seekable", out.OpenFlags)
	}
	return &file{c: c, node: node, fh: out.Fh}, 0
}

func (c *client) open(path string, flags uint32) (*file, syscall.Errno) {
	node, _, errno := c.lookup(path)
	if errno != 0 {
		return nil, errno
	}
	return c.openNode(node, flags)
}

func (c *client) mustOpen(path string, flags uint32) *file {
	c.t.Helper()
	f, errno := c.open(path, flags)
	if errno != 0 {
		c.t.Fatalf("open %s: %v", path, errno)
	}
	return f
}

func (f *file) read(n int) ([]byte, syscall.Errno) { return f.readInto(make([]byte, n)) }

// readInto reads into buf as a FUSE transport does: the reply may be
// buf itself or other memory.
func (f *file) readInto(buf []byte) ([]byte, syscall.Errno) {
	in := fuse.ReadIn{InHeader: f.c.hdr(f.node), Fh: f.fh, Offset: f.off, Size: uint32(len(buf))}
	res, st := f.c.fs.Read(nil, &in, buf)
	if st != fuse.OK {
		return nil, syscall.Errno(st)
	}
	b, st := res.Bytes(buf)
	res.Done()
	if st != fuse.OK {
		return nil, syscall.Errno(st)
	}
	f.off += uint64(len(b))
	return b, 0
}

// readAll reads until end of file.
func (f *file) readAll() (string, syscall.Errno) {
	var s []byte
	for {
		b, errno := f.read(4096)
		if errno != 0 {
			return string(s), errno
		}
		if len(b) == 0 {
			return string(s), 0
		}
		s = append(s, b...)
	}
}

func (f *file) writev(segs ...[]byte) (int, syscall.Errno) {
	total := 0
	for _, s := range segs {
		total += len(s)
	}
	in := fuse.WriteIn{InHeader: f.c.hdr(f.node), Fh: f.fh, Offset: f.off, Size: uint32(total)}
	n, st := f.c.fs.Writev(nil, &in, segs)
	if st != fuse.OK {
		return 0, syscall.Errno(st)
	}
	f.off += uint64(n)
	return int(n), 0
}

func (f *file) write(s string) syscall.Errno {
	n, errno := f.writev([]byte(s))
	if errno == 0 && n != len(s) {
		f.c.t.Errorf("short write %d of %d", n, len(s))
	}
	return errno
}

func (f *file) release() {
	in := fuse.ReleaseIn{InHeader: f.c.hdr(f.node), Fh: f.fh}
	f.c.fs.Release(nil, &in)
}

// cat reads a whole file.
func (c *client) cat(path string) string {
	c.t.Helper()
	f := c.mustOpen(path, syscall.O_RDONLY)
	defer f.release()
	s, errno := f.readAll()
	if errno != 0 {
		c.t.Fatalf("read %s: %v", path, errno)
	}
	return s
}

// readDir lists a directory's names.
func (c *client) readDir(path string, plus bool) ([]string, syscall.Errno) {
	node := uint64(fuse.FUSE_ROOT_ID)
	if path != "" {
		var errno syscall.Errno
		if node, _, errno = c.lookup(path); errno != 0 {
			return nil, errno
		}
	}
	oin := fuse.OpenIn{InHeader: c.hdr(node)}
	var oout fuse.OpenOut
	if st := c.fs.OpenDir(nil, &oin, &oout); st != fuse.OK {
		return nil, syscall.Errno(st)
	}
	var names []string
	off := uint64(0)
	for {
		// A small buffer, so listing takes several calls.
		l := fuse.NewDirEntryList(make([]byte, 200), off)
		in := fuse.ReadIn{InHeader: c.hdr(node), Fh: oout.Fh, Offset: off, Size: 200}
		var st fuse.Status
		if plus {
			st = c.fs.ReadDirPlus(nil, &in, l)
		} else {
			st = c.fs.ReadDir(nil, &in, l)
		}
		if st != fuse.OK {
			return nil, syscall.Errno(st)
		}
		b := l.Bytes()
		if len(b) == 0 {
			break
		}
		for len(b) > 0 {
			if plus {
				b = b[unsafeSizeofEntryOut:]
			}
			// struct fuse_dirent: ino, off, namelen, type, name, padding to 8.
			nl := int(binary.LittleEndian.Uint32(b[16:]))
			names = append(names, string(b[24:24+nl]))
			off = binary.LittleEndian.Uint64(b[8:])
			b = b[min(len(b), (24+nl+7)&^7):]
		}
	}
	c.fs.ReleaseDir(&fuse.ReleaseIn{InHeader: c.hdr(node), Fh: oout.Fh})
	return names, 0
}

const unsafeSizeofEntryOut = int(unsafe.Sizeof(fuse.EntryOut{}))

// clone opens tcp/clone and returns the ctl file and its number.
func (c *client) clone() (*file, string) {
	c.t.Helper()
	f := c.mustOpen("tcp/clone", syscall.O_RDWR)
	s, errno := f.readAll()
	if errno != 0 || !strings.HasSuffix(s, "\n") {
		c.t.Fatalf("read clone: %q %v", s, errno)
	}
	return f, strings.TrimSuffix(s, "\n")
}

// dial clones a connection and connects it to dst ("addr!port"), failing
// the test if either fails; it returns the ctl file and the number.
func (c *client) dial(dst string) (*file, string) {
	c.t.Helper()
	ctl, n := c.clone()
	if errno := ctl.write("connect " + dst); errno != 0 {
		ctl.release()
		c.t.Fatalf("connect %s: %v", dst, errno)
	}
	return ctl, n
}

// echoWorld is a world whose VM reaches the fabric's /24 over SDP, with
// an echo service (echo) on the remote peer's port 7.
func echoWorld(t testing.TB, opts sockfs.Options) *world {
	t.Helper()
	w := newWorld(t, sdpback.Policy{rule(t, "sdp 10.9.0.0/24")}, opts)
	dialServe(t, w.peerSt, 7, echo)
	return w
}

// dialServe serves an SDP listener on st: each connection is handed to fn.
func dialServe(t testing.TB, st *sdp.Stack, port uint16, fn func(*sdp.Conn)) {
	l, err := st.Listen(port, 8)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.AcceptSDP(context.Background())
			if err != nil {
				return
			}
			go fn(c)
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
}

// echo copies until EOF, then closes.
func echo(c *sdp.Conn) {
	io.Copy(c, c)
	c.CloseWrite()
	io.Copy(io.Discard, c)
	c.Close()
}
