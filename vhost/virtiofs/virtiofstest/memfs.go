package virtiofstest

import (
	"context"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Gate parks reads: every Read of a file with a gate waits until the gate
// lets one through (Release), the request is cancelled (go-fuse closes its
// context on FUSE_INTERRUPT) or the gate is hung up. It stands in for a
// stream file whose peer is quiet.
type Gate struct {
	// IgnoreCancel makes parked reads ignore their context: only Release
	// and HangUp free them (a filesystem that needs the OnStop hook).
	IgnoreCancel bool

	mu     sync.Mutex
	parked int
	change chan struct{} // closed and replaced when parked changes
	tokens chan struct{}
	hang   chan struct{}
	hung   bool
}

// NewGate returns a closed gate.
func NewGate() *Gate {
	return &Gate{change: make(chan struct{}), tokens: make(chan struct{}, 1<<16), hang: make(chan struct{})}
}

func (g *Gate) add(k int) {
	g.mu.Lock()
	g.parked += k
	close(g.change)
	g.change = make(chan struct{})
	g.mu.Unlock()
}

// pass parks the caller; it returns 0 when let through.
func (g *Gate) pass(ctx context.Context) syscall.Errno {
	g.add(1)
	defer g.add(-1)
	done := ctx.Done()
	if g.IgnoreCancel {
		done = nil
	}
	select {
	case <-g.tokens:
		return 0
	case <-done:
		return syscall.EINTR
	case <-g.hang:
		return syscall.EIO
	}
}

// Release lets n parked (or future) reads through.
func (g *Gate) Release(n int) {
	for range n {
		g.tokens <- struct{}{}
	}
}

// HangUp fails every parked and future read with EIO. Idempotent.
func (g *Gate) HangUp() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.hung {
		g.hung = true
		close(g.hang)
	}
}

// Parked returns the number of reads waiting now.
func (g *Gate) Parked() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.parked
}

// WaitParked waits up to d until exactly n reads are parked.
func (g *Gate) WaitParked(n int, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		g.mu.Lock()
		p, ch := g.parked, g.change
		g.mu.Unlock()
		if p == n {
			return true
		}
		select {
		case <-ch:
		case <-t.C:
			return false
		}
	}
}

// File is a regular file held in memory. Opens are direct I/O, so every
// read and write reaches the device.
type File struct {
	fs.Inode
	mu   sync.Mutex
	data []byte
	gate *Gate
}

var (
	_ fs.NodeOpener    = (*File)(nil)
	_ fs.NodeReader    = (*File)(nil)
	_ fs.NodeWriter    = (*File)(nil)
	_ fs.NodeGetattrer = (*File)(nil)
	_ fs.NodeSetattrer = (*File)(nil)
)

// Bytes returns a copy of the content.
func (f *File) Bytes() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.data...)
}

// Open implements fs.NodeOpener.
func (f *File) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_TRUNC != 0 {
		f.mu.Lock()
		f.data = f.data[:0]
		f.mu.Unlock()
	}
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

// Read implements fs.NodeReader (parking first if the file has a gate).
func (f *File) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if f.gate != nil {
		if errno := f.gate.pass(ctx); errno != 0 {
			return nil, errno
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 || off >= int64(len(f.data)) {
		return fuse.ReadResultData(nil), 0
	}
	n := copy(dest, f.data[off:])
	return fuse.ReadResultData(dest[:n]), 0
}

// Write implements fs.NodeWriter.
func (f *File) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off < 0 || off > 1<<30 {
		return 0, syscall.EFBIG
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	end := int(off) + len(data)
	if end > len(f.data) {
		f.data = append(f.data, make([]byte, end-len(f.data))...)
	}
	copy(f.data[off:], data)
	return uint32(len(data)), 0
}

// Getattr implements fs.NodeGetattrer.
func (f *File) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.mu.Lock()
	defer f.mu.Unlock()
	out.Mode = syscall.S_IFREG | 0o666
	out.Size = uint64(len(f.data))
	out.Nlink = 1
	return 0
}

// Setattr implements fs.NodeSetattrer (size changes only).
func (f *File) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok {
		if sz > 1<<30 {
			return syscall.EFBIG
		}
		f.mu.Lock()
		if int(sz) <= len(f.data) {
			f.data = f.data[:sz]
		} else {
			f.data = append(f.data, make([]byte, int(sz)-len(f.data))...)
		}
		f.mu.Unlock()
	}
	return f.Getattr(ctx, fh, out)
}

// Dir is a directory held in memory; files and directories can be made
// in it.
type Dir struct {
	fs.Inode
}

var (
	_ fs.NodeCreater   = (*Dir)(nil)
	_ fs.NodeMkdirer   = (*Dir)(nil)
	_ fs.NodeGetattrer = (*Dir)(nil)
)

// Getattr implements fs.NodeGetattrer.
func (d *Dir) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o777
	out.Nlink = 2
	return 0
}

// Create implements fs.NodeCreater.
func (d *Dir) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	f := &File{}
	ch := d.NewPersistentInode(ctx, f, fs.StableAttr{Mode: syscall.S_IFREG})
	if !d.AddChild(name, ch, false) {
		return nil, nil, 0, syscall.EEXIST
	}
	var ao fuse.AttrOut
	f.Getattr(ctx, nil, &ao)
	out.Attr = ao.Attr
	return ch, nil, fuse.FOPEN_DIRECT_IO, 0
}

// Mkdir implements fs.NodeMkdirer.
func (d *Dir) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	sub := &Dir{}
	ch := d.NewPersistentInode(ctx, sub, fs.StableAttr{Mode: syscall.S_IFDIR})
	if !d.AddChild(name, ch, false) {
		return nil, syscall.EEXIST
	}
	var ao fuse.AttrOut
	sub.Getattr(ctx, nil, &ao)
	out.Attr = ao.Attr
	return ch, 0
}

// MemFS is a small in-memory filesystem for tests: a root directory with
// the files it was made with (some parked behind a gate) and a
// subdirectory "sub".
type MemFS struct {
	Dir
	init map[string]*File
}

// NewMemFS returns a filesystem with the given files; files named in
// gated park every read behind gate.
func NewMemFS(files map[string][]byte, gate *Gate, gated ...string) *MemFS {
	m := &MemFS{init: map[string]*File{}}
	for n, b := range files {
		m.init[n] = &File{data: append([]byte(nil), b...)}
	}
	for _, n := range gated {
		f, ok := m.init[n]
		if !ok {
			f = &File{}
			m.init[n] = f
		}
		f.gate = gate
	}
	return m
}

// OnAdd implements fs.NodeOnAdder: the tree is built when the filesystem
// is mounted (RawFS).
func (m *MemFS) OnAdd(ctx context.Context) {
	for n, f := range m.init {
		m.AddChild(n, m.NewPersistentInode(ctx, f, fs.StableAttr{Mode: syscall.S_IFREG}), false)
	}
	m.AddChild("sub", m.NewPersistentInode(ctx, &Dir{}, fs.StableAttr{Mode: syscall.S_IFDIR}), false)
}

// RawFS returns the filesystem as go-fuse's RawFileSystem, with zero entry
// and attribute timeouts. Call it once.
func (m *MemFS) RawFS() fuse.RawFileSystem {
	zero := time.Duration(0)
	return fs.NewNodeFS(m, &fs.Options{EntryTimeout: &zero, AttrTimeout: &zero})
}

// File returns the file called name in the root, or nil.
func (m *MemFS) File(name string) *File {
	ch := m.GetChild(name)
	if ch == nil {
		return nil
	}
	f, _ := ch.Operations().(*File)
	return f
}
