package sockfs

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/sdpback"
)

// Options tune a socket filesystem. The zero value means the defaults.
type Options struct {
	// MaxIdle bounds connection directories without a live stream (Idle,
	// Closed, failed); the VM's stream limit bounds the others. Default
	// DefaultMaxIdle.
	MaxIdle int
	// MaxHandles bounds open files. Default DefaultMaxHandles.
	MaxHandles int
	// Backlog is the listen backlog of an announce. Default DefaultBacklog.
	Backlog int
}

// Defaults.
const (
	DefaultMaxIdle    = 64
	DefaultMaxHandles = 4096
	DefaultBacklog    = 16
)

// Node IDs are structural, so nothing is allocated per LOOKUP and FORGET
// has nothing to free: the fixed nodes below, and for connection
// directories connBase + incarnation<<3 | kind. Incarnations count up and
// are never reused, so a node ID the kernel still holds for a released
// directory resolves to nothing (ESTALE), even when its number N is in
// use again.
const (
	nodeRoot   = fuse.FUSE_ROOT_ID
	nodeTCP    = 2
	nodeClone  = 3
	nodeStats  = 4
	nodePolicy = 5
	connBase   = 16
	maxInc     = 1 << 58
)

// kind is a node of a connection directory.
type kind uint8

const (
	kDir kind = iota
	kCtl
	kData
	kListen
	kLocal
	kRemote
	kStatus
	kStats
	nKinds
)

var kindNames = [nKinds]string{"", "ctl", "data", "listen", "local", "remote", "status", "stats"}

func connNode(inc uint64, k kind) uint64 { return connBase + inc<<3 | uint64(k) }

// rawDefaults answers the operations the tree does not implement (ENOSYS).
type rawDefaults interface{ fuse.RawFileSystem }

// FS is the socket filesystem of one VM: a fuse.RawFileSystem serving the
// namespace in doc.go, to be served by a FUSE transport (the virtio-fs
// device through fuse.ProtocolServer).
type FS struct {
	rawDefaults
	vm   *sdpback.VM
	opts Options
	born time.Time

	ctx    context.Context // ended by Close: every parked connect and listen
	cancel context.CancelFunc

	mu      sync.Mutex
	conns   map[int]*conn
	incs    map[uint64]*conn
	handles map[uint64]*handle
	nextInc uint64
	nextFh  uint64
	closed  bool
}

var _ fuse.RawFileSystem = (*FS)(nil)

// New returns vm's socket filesystem.
func New(vm *sdpback.VM, opts Options) *FS {
	if opts.MaxIdle <= 0 {
		opts.MaxIdle = DefaultMaxIdle
	}
	if opts.MaxHandles <= 0 {
		opts.MaxHandles = DefaultMaxHandles
	}
	if opts.Backlog <= 0 {
		opts.Backlog = DefaultBacklog
	}
	fs := &FS{rawDefaults: fuse.NewDefaultRawFileSystem(), vm: vm, opts: opts, born: time.Now(),
		conns: map[int]*conn{}, incs: map[uint64]*conn{}, handles: map[uint64]*handle{}}
	fs.ctx, fs.cancel = context.WithCancel(context.Background())
	return fs
}

// RawFS returns fs as the raw filesystem a FUSE transport serves.
func (fs *FS) RawFS() fuse.RawFileSystem { return fs }

// Close hangs up every connection and completes every parked request:
// blocked reads return EOF, blocked writes EPIPE, a parked connect
// ECONNABORTED and a parked listen open ECONNABORTED. Later opens fail
// with ENXIO. Open handles stay valid until released. Idempotent.
func (fs *FS) Close() error {
	fs.mu.Lock()
	if fs.closed {
		fs.mu.Unlock()
		return nil
	}
	fs.closed = true
	cs := make([]*conn, 0, len(fs.conns))
	for _, c := range fs.conns {
		cs = append(cs, c)
	}
	fs.mu.Unlock()
	fs.cancel()
	for _, c := range cs {
		c.hangup()
	}
	return nil
}

// Reset ends the FUSE session (the guest reset its device, or a request
// ring stopped): like Close it hangs up every connection and completes
// every parked request, and it forgets every handle and connection
// directory, whose node IDs answer ESTALE from then on; unlike Close the
// filesystem then serves the next session. A no-op after Close.
func (fs *FS) Reset() {
	fs.mu.Lock()
	if fs.closed {
		fs.mu.Unlock()
		return
	}
	cs := make([]*conn, 0, len(fs.conns))
	for _, c := range fs.conns {
		cs = append(cs, c)
	}
	fs.conns, fs.incs, fs.handles = map[int]*conn{}, map[uint64]*conn{}, map[uint64]*handle{}
	cancel := fs.cancel
	fs.ctx, fs.cancel = context.WithCancel(context.Background())
	fs.mu.Unlock()
	cancel()
	for _, c := range cs {
		c.hangup()
	}
}

// handle is one open file.
type handle struct {
	k           kind   // kCtl, kData or a text kind; 0 with node for top-level files
	node        uint64 // nodeStats or nodePolicy for top-level files
	c           *conn
	read, write bool

	mu   sync.Mutex
	snap []byte // text content, taken at offset 0
}

// node is a resolved node ID.
type node struct {
	id uint64
	k  kind
	c  *conn // nil for the fixed nodes
}

func (n node) isDir() bool {
	return n.id == nodeRoot || n.id == nodeTCP || (n.c != nil && n.k == kDir)
}

// resolve finds a node by ID.
func (fs *FS) resolve(id uint64) (node, syscall.Errno) {
	switch id {
	case nodeRoot, nodeTCP, nodeClone, nodeStats, nodePolicy:
		return node{id: id}, 0
	}
	if id < connBase {
		return node{}, syscall.ESTALE
	}
	inc, k := (id-connBase)>>3, kind((id-connBase)&7)
	fs.mu.Lock()
	c := fs.incs[inc]
	fs.mu.Unlock()
	if c == nil {
		return node{}, syscall.ESTALE
	}
	return node{id: id, k: k, c: c}, 0
}

// mode returns a node's file type, permissions and owner.
func (n node) mode() (mode, uid, gid uint32) {
	switch {
	case n.c != nil && n.k == kDir:
		return syscall.S_IFDIR | 0700, n.c.uid, n.c.gid
	case n.c != nil:
		switch n.k {
		case kCtl, kData, kListen:
			return syscall.S_IFREG | 0600, n.c.uid, n.c.gid
		}
		return syscall.S_IFREG | 0400, n.c.uid, n.c.gid
	case n.id == nodeRoot, n.id == nodeTCP:
		return syscall.S_IFDIR | 0555, 0, 0
	case n.id == nodeClone:
		return syscall.S_IFREG | 0666, 0, 0
	}
	return syscall.S_IFREG | 0444, 0, 0
}

// Permission bits asked for.
const (
	permR = 4
	permW = 2
	permX = 1
)

// allowed applies the mode bits to caller (root may do anything, as with
// the kernel's default_permissions). The check does not depend on the
// mount's default_permissions: the tree enforces ownership itself.
func (n node) allowed(caller fuse.Caller, want uint32) bool {
	if caller.Uid == 0 {
		return true
	}
	mode, uid, gid := n.mode()
	bits := mode & 7
	switch {
	case caller.Uid == uid:
		bits = mode >> 6 & 7
	case caller.Gid == gid:
		bits = mode >> 3 & 7
	}
	return bits&want == want
}

func (fs *FS) fill(n node, a *fuse.Attr) {
	mode, uid, gid := n.mode()
	born := fs.born
	if n.c != nil {
		born = n.c.born
	}
	*a = fuse.Attr{Ino: n.id, Mode: mode, Nlink: 1, Owner: fuse.Owner{Uid: uid, Gid: gid}, Blksize: 4096}
	if mode&syscall.S_IFDIR != 0 {
		a.Nlink = 2
	}
	sec, nsec := uint64(born.Unix()), uint32(born.Nanosecond())
	a.Atime, a.Mtime, a.Ctime = sec, sec, sec
	a.Atimensec, a.Mtimensec, a.Ctimensec = nsec, nsec, nsec
}

// entry fills a LOOKUP or READDIRPLUS reply; timeouts stay zero, so the
// guest revalidates every name and attribute.
func (fs *FS) entry(n node, out *fuse.EntryOut) {
	*out = fuse.EntryOut{NodeId: n.id}
	fs.fill(n, &out.Attr)
}

// child resolves name in dir n.
func (fs *FS) child(caller fuse.Caller, n node, name string) (node, syscall.Errno) {
	if !n.isDir() {
		return node{}, syscall.ENOTDIR
	}
	if !n.allowed(caller, permX) {
		return node{}, syscall.EACCES
	}
	switch {
	case n.id == nodeRoot:
		switch name {
		case "tcp":
			return node{id: nodeTCP}, 0
		case "stats":
			return node{id: nodeStats}, 0
		case "policy":
			return node{id: nodePolicy}, 0
		}
	case n.id == nodeTCP:
		if name == "clone" {
			return node{id: nodeClone}, 0
		}
		num, err := strconv.Atoi(name)
		if err != nil || num < 0 || strconv.Itoa(num) != name {
			return node{}, syscall.ENOENT
		}
		fs.mu.Lock()
		c := fs.conns[num]
		fs.mu.Unlock()
		if c != nil {
			return node{id: connNode(c.inc, kDir), k: kDir, c: c}, 0
		}
	default: // a connection directory
		for k := kCtl; k < nKinds; k++ {
			if kindNames[k] == name {
				return node{id: connNode(n.c.inc, k), k: k, c: n.c}, 0
			}
		}
	}
	return node{}, syscall.ENOENT
}

// String implements fuse.RawFileSystem.
func (fs *FS) String() string { return "sockfs" }

// SetDebug implements fuse.RawFileSystem (the library never logs).
func (fs *FS) SetDebug(bool) {}

// Init implements fuse.RawFileSystem. The tree sends no notifications
// (virtio-fs has no path for them).
func (fs *FS) Init(*fuse.Server) {}

// OnUnmount implements fuse.RawFileSystem.
func (fs *FS) OnUnmount() {}

// Lookup implements fuse.RawFileSystem.
func (fs *FS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	parent, errno := fs.resolve(h.NodeId)
	if errno != 0 {
		return status(errno)
	}
	n, errno := fs.child(h.Caller, parent, name)
	if errno != 0 {
		return status(errno)
	}
	fs.entry(n, out)
	return fuse.OK
}

// Forget implements fuse.RawFileSystem: node IDs are structural, nothing
// is held per lookup.
func (fs *FS) Forget(nodeid, nlookup uint64) {}

// GetAttr implements fuse.RawFileSystem.
func (fs *FS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, errno := fs.resolve(in.NodeId)
	if errno != 0 {
		return status(errno)
	}
	*out = fuse.AttrOut{}
	fs.fill(n, &out.Attr)
	return fuse.OK
}

// SetAttr implements fuse.RawFileSystem: only what a shell's O_TRUNC
// open and touch send (size 0, times) is accepted, and changes nothing.
func (fs *FS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, errno := fs.resolve(in.NodeId)
	if errno != 0 {
		return status(errno)
	}
	const harmless = fuse.FATTR_SIZE | fuse.FATTR_FH | fuse.FATTR_LOCKOWNER | fuse.FATTR_ATIME | fuse.FATTR_MTIME |
		fuse.FATTR_ATIME_NOW | fuse.FATTR_MTIME_NOW | fuse.FATTR_CTIME | fuse.FATTR_KILL_SUIDGID
	if in.Valid&^harmless != 0 || (in.Valid&fuse.FATTR_SIZE != 0 && in.Size != 0) {
		return status(syscall.EPERM)
	}
	if n.isDir() {
		if in.Valid&fuse.FATTR_SIZE != 0 {
			return status(syscall.EISDIR)
		}
	} else if !n.allowed(in.Caller, permW) {
		return status(syscall.EACCES)
	}
	*out = fuse.AttrOut{}
	fs.fill(n, &out.Attr)
	return fuse.OK
}

// Access implements fuse.RawFileSystem.
func (fs *FS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	n, errno := fs.resolve(in.NodeId)
	if errno != 0 {
		return status(errno)
	}
	if !n.allowed(in.Caller, in.Mask&7) {
		return status(syscall.EACCES)
	}
	return fuse.OK
}

// The namespace is fixed: nothing is created, removed or renamed.

// Mknod implements fuse.RawFileSystem.
func (fs *FS) Mknod(<-chan struct{}, *fuse.MknodIn, string, *fuse.EntryOut) fuse.Status {
	return status(syscall.EPERM)
}

// Mkdir implements fuse.RawFileSystem.
func (fs *FS) Mkdir(<-chan struct{}, *fuse.MkdirIn, string, *fuse.EntryOut) fuse.Status {
	return status(syscall.EPERM)
}

// Unlink implements fuse.RawFileSystem.
func (fs *FS) Unlink(<-chan struct{}, *fuse.InHeader, string) fuse.Status {
	return status(syscall.EPERM)
}

// Rmdir implements fuse.RawFileSystem.
func (fs *FS) Rmdir(<-chan struct{}, *fuse.InHeader, string) fuse.Status {
	return status(syscall.EPERM)
}

// Rename implements fuse.RawFileSystem.
func (fs *FS) Rename(<-chan struct{}, *fuse.RenameIn, string, string) fuse.Status {
	return status(syscall.EPERM)
}

// Link implements fuse.RawFileSystem.
func (fs *FS) Link(<-chan struct{}, *fuse.LinkIn, string, *fuse.EntryOut) fuse.Status {
	return status(syscall.EPERM)
}

// Symlink implements fuse.RawFileSystem.
func (fs *FS) Symlink(<-chan struct{}, *fuse.InHeader, string, string, *fuse.EntryOut) fuse.Status {
	return status(syscall.EPERM)
}

// Create implements fuse.RawFileSystem.
func (fs *FS) Create(<-chan struct{}, *fuse.CreateIn, string, *fuse.CreateOut) fuse.Status {
	return status(syscall.EPERM)
}

// Lseek implements fuse.RawFileSystem: every file is a stream.
func (fs *FS) Lseek(<-chan struct{}, *fuse.LseekIn, *fuse.LseekOut) fuse.Status {
	return status(syscall.ESPIPE)
}

// Flush implements fuse.RawFileSystem.
func (fs *FS) Flush(<-chan struct{}, *fuse.FlushIn) fuse.Status { return fuse.OK }

// Fsync implements fuse.RawFileSystem.
func (fs *FS) Fsync(<-chan struct{}, *fuse.FsyncIn) fuse.Status { return fuse.OK }

// StatFs implements fuse.RawFileSystem.
func (fs *FS) StatFs(cancel <-chan struct{}, in *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	*out = fuse.StatfsOut{Bsize: 4096, Frsize: 4096, NameLen: 255}
	return fuse.OK
}

// openFlags: every file is direct I/O (no page cache: each read and write
// reaches the stream) and non-seekable.
const openFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_NONSEEKABLE

// Open implements fuse.RawFileSystem. O_NONBLOCK is ignored: reads and
// writes block (see doc.go). Opening tcp/clone creates a connection
// directory and returns its ctl; opening tcp/N/listen waits for a call and
// returns the new connection's ctl.
func (fs *FS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n, errno := fs.resolve(in.NodeId)
	if errno != 0 {
		return status(errno)
	}
	if n.isDir() {
		return status(syscall.EISDIR)
	}
	h := &handle{k: n.k, c: n.c}
	switch in.Flags & syscall.O_ACCMODE {
	case syscall.O_RDONLY:
		h.read = true
	case syscall.O_WRONLY:
		h.write = true
	case syscall.O_RDWR:
		h.read, h.write = true, true
	default:
		return status(syscall.EINVAL)
	}
	var want uint32
	if h.read {
		want |= permR
	}
	if h.write {
		want |= permW
	}
	if !n.allowed(in.Caller, want) {
		return status(syscall.EACCES)
	}
	switch {
	case n.id == nodeClone:
		c, errno := fs.newConn(in.Caller, nil)
		if errno != 0 {
			return status(errno)
		}
		h.k, h.c = kCtl, c
		return fs.register(h, out, true)
	case n.c == nil:
		h.node = n.id
	case n.k == kListen:
		return fs.listen(cancel, in.Caller, n.c, h, out)
	}
	return fs.register(h, out, false)
}

// register adds h to the handle table (h.c's first reference when fresh).
func (fs *FS) register(h *handle, out *fuse.OpenOut, fresh bool) fuse.Status {
	fs.mu.Lock()
	errno := syscall.Errno(0)
	switch {
	case fs.closed:
		errno = syscall.ENXIO
	case len(fs.handles) >= fs.opts.MaxHandles:
		errno = syscall.ENFILE
	case h.c != nil && !fresh && fs.incs[h.c.inc] != h.c:
		errno = syscall.ESTALE // released while this open ran
	}
	if errno != 0 {
		fs.mu.Unlock()
		if fresh {
			fs.unref(h.c)
		}
		return status(errno)
	}
	fs.nextFh++
	fh := fs.nextFh
	fs.handles[fh] = h
	if h.c != nil && !fresh {
		h.c.refs++
	}
	fs.mu.Unlock()
	*out = fuse.OpenOut{Fh: fh, OpenFlags: openFlags}
	return fuse.OK
}

// newConn creates connection directory N owned by caller, holding one
// reference (the open that created it). st, when set, is an accepted
// stream.
func (fs *FS) newConn(caller fuse.Caller, st *sdpback.FileConn) (*conn, syscall.Errno) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.closed {
		return nil, syscall.ENXIO
	}
	limit := fs.vm.Config().MaxStreams + fs.opts.MaxIdle
	if len(fs.conns) >= limit || len(fs.handles) >= fs.opts.MaxHandles || fs.nextInc >= maxInc {
		return nil, syscall.ENFILE
	}
	if st == nil {
		idle := 0
		for _, c := range fs.conns {
			if c.idle() {
				idle++
			}
		}
		if idle >= fs.opts.MaxIdle {
			return nil, syscall.ENFILE
		}
	}
	num := 0
	for fs.conns[num] != nil {
		num++
	}
	fs.nextInc++
	c := newConn(fs, num, fs.nextInc, caller.Owner, st)
	c.refs = 1
	fs.conns[num] = c
	fs.incs[c.inc] = c
	return c, 0
}

// unref drops a reference to c; the last one hangs c up and releases its
// number and nodes.
func (fs *FS) unref(c *conn) {
	fs.mu.Lock()
	c.refs--
	last := c.refs == 0
	if last {
		if fs.conns[c.num] == c {
			delete(fs.conns, c.num)
		}
		delete(fs.incs, c.inc)
	}
	fs.mu.Unlock()
	if last {
		c.hangup()
	}
}

// handle returns the open file fh.
func (fs *FS) handle(fh uint64) *handle {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.handles[fh]
}

// Release implements fuse.RawFileSystem: closing the last file of a
// connection hangs it up.
func (fs *FS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	fs.mu.Lock()
	h := fs.handles[in.Fh]
	delete(fs.handles, in.Fh)
	fs.mu.Unlock()
	if h != nil && h.c != nil {
		fs.unref(h.c)
	}
}

// Read implements fuse.RawFileSystem.
func (fs *FS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	h := fs.handle(in.Fh)
	if h == nil || !h.read {
		return nil, status(syscall.EBADF)
	}
	buf = buf[:min(len(buf), int(in.Size))]
	if h.k == kData {
		n, errno := h.c.read(buf)
		if errno != 0 {
			return nil, status(errno)
		}
		return fuse.ReadResultData(buf[:n]), fuse.OK
	}
	var text []byte
	if h.k == kCtl {
		text = []byte(strconv.Itoa(h.c.num) + "\n")
	} else {
		h.mu.Lock()
		if in.Offset == 0 || h.snap == nil {
			h.snap = fs.text(h)
		}
		text = h.snap
		h.mu.Unlock()
	}
	if in.Offset >= uint64(len(text)) {
		return fuse.ReadResultData(nil), fuse.OK
	}
	return fuse.ReadResultData(buf[:copy(buf, text[in.Offset:])]), fuse.OK
}

// Write implements fuse.RawFileSystem.
func (fs *FS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	return fs.Writev(cancel, in, [][]byte{data})
}

// Writev implements fuse.RawFileSystem: data writes go to the stream
// segment by segment, straight from the request's buffers.
func (fs *FS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	h := fs.handle(in.Fh)
	if h == nil || !h.write {
		return 0, status(syscall.EBADF)
	}
	switch h.k {
	case kData:
		var n int
		for _, seg := range data {
			k, errno := h.c.write(seg)
			n += k
			if errno != 0 {
				if n > 0 {
					return uint32(n), fuse.OK
				}
				return 0, status(errno)
			}
		}
		return uint32(n), fuse.OK
	case kCtl:
		var b []byte
		total := 0
		for _, seg := range data {
			total += len(seg)
		}
		if total > MaxCtl {
			return 0, status(syscall.EINVAL)
		}
		for _, seg := range data {
			b = append(b, seg...)
		}
		cmd, err := ParseCmd(b)
		if err != nil {
			return 0, status(errnoOf(err, syscall.EINVAL))
		}
		if errno := h.c.ctl(cancel, cmd); errno != 0 {
			return 0, status(errno)
		}
		return uint32(total), fuse.OK
	}
	return 0, status(syscall.EBADF)
}

// listen parks an open of tcp/N/listen until a call arrives on N's
// announcement, then returns the new connection's ctl.
func (fs *FS) listen(cancel <-chan struct{}, caller fuse.Caller, c *conn, h *handle, out *fuse.OpenOut) fuse.Status {
	st, errno := c.accept(cancel)
	if errno != 0 {
		return status(errno)
	}
	m, errno := fs.newConn(caller, st)
	if errno != 0 {
		st.Abort()
		return status(errno)
	}
	h.k, h.c = kCtl, m
	return fs.register(h, out, true)
}

// OpenDir implements fuse.RawFileSystem.
func (fs *FS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if _, errno := fs.listable(&in.InHeader); errno != 0 {
		return status(errno)
	}
	*out = fuse.OpenOut{}
	return fuse.OK
}

// ReleaseDir implements fuse.RawFileSystem (directories hold no state).
func (fs *FS) ReleaseDir(*fuse.ReleaseIn) {}

// FsyncDir implements fuse.RawFileSystem.
func (fs *FS) FsyncDir(<-chan struct{}, *fuse.FsyncIn) fuse.Status { return fuse.OK }

// ReadDir implements fuse.RawFileSystem.
func (fs *FS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

// ReadDirPlus implements fuse.RawFileSystem.
func (fs *FS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

type dirent struct {
	off  uint64 // stable across calls: the kernel resumes after it
	name string
	n    node
}

// listable resolves the directory a request names, if its caller may
// list it.
func (fs *FS) listable(h *fuse.InHeader) (node, syscall.Errno) {
	n, errno := fs.resolve(h.NodeId)
	switch {
	case errno != 0:
		return node{}, errno
	case !n.isDir():
		return node{}, syscall.ENOTDIR
	case !n.allowed(h.Caller, permR):
		return node{}, syscall.EACCES
	}
	return n, 0
}

func (fs *FS) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	n, errno := fs.listable(&in.InHeader)
	if errno != 0 {
		return status(errno)
	}
	ents := []dirent{{1, ".", n}, {2, "..", node{id: nodeRoot}}}
	switch {
	case n.id == nodeRoot:
		ents = append(ents, dirent{3, "tcp", node{id: nodeTCP}}, dirent{4, "stats", node{id: nodeStats}}, dirent{5, "policy", node{id: nodePolicy}})
	case n.id == nodeTCP:
		ents = append(ents, dirent{3, "clone", node{id: nodeClone}})
		fs.mu.Lock()
		for num, c := range fs.conns {
			ents = append(ents, dirent{4 + uint64(num), strconv.Itoa(num), node{id: connNode(c.inc, kDir), c: c}})
		}
		fs.mu.Unlock()
		sort.Slice(ents, func(i, j int) bool { return ents[i].off < ents[j].off })
	default:
		ents[1].n = node{id: nodeTCP}
		for k := kCtl; k < nKinds; k++ {
			ents = append(ents, dirent{2 + uint64(k), kindNames[k], node{id: connNode(n.c.inc, k), k: k, c: n.c}})
		}
	}
	for _, e := range ents {
		if e.off <= in.Offset {
			continue
		}
		mode, _, _ := e.n.mode()
		de := fuse.DirEntry{Name: e.name, Mode: mode, Ino: e.n.id, Off: e.off}
		if !plus {
			if !out.AddDirEntry(de) {
				break
			}
			continue
		}
		eo := out.AddDirLookupEntry(de)
		if eo == nil {
			break
		}
		if e.name != "." && e.name != ".." {
			fs.entry(e.n, eo)
		}
	}
	return fuse.OK
}

// text renders a read-only file.
func (fs *FS) text(h *handle) []byte {
	switch {
	case h.node == nodeStats:
		return fs.statsText()
	case h.node == nodePolicy:
		return []byte(fs.vm.Config().Policy.String())
	}
	return h.c.text(h.k)
}

// statsText renders /stats: the VM's counters, then one line per stream.
func (fs *FS) statsText() []byte {
	cfg, st := fs.vm.Config(), fs.vm.Stats()
	fs.mu.Lock()
	dirs := len(fs.conns)
	fs.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "vm %s\naddr %s\ndials %d\ndenied %d\nlocal %d\ndial-failures %d\n",
		cfg.Name, cfg.Addr, st.Dials, st.Denied, st.Locals, st.DialFailures)
	fmt.Fprintf(&b, "streams %d\nlisteners %d\nctl-conns %d\nbad-control %d\nfrom-guest %d\nto-guest %d\nconn-dirs %d\n",
		st.Streams, st.Listeners, st.CtlConns, st.BadControl, st.FromGuest, st.ToGuest, dirs)
	var lines []string
	for _, s := range fs.vm.Streams() {
		via := "file"
		if s.GuestPort != 0 || s.HostPort != 0 {
			via = fmt.Sprintf("vsock %d:%d", s.GuestPort, s.HostPort)
		}
		lines = append(lines, fmt.Sprintf("stream %s %s %s out %d in %d %s\n",
			s.Path, FormatAddr(s.Local), FormatAddr(s.Remote), s.FromGuest, s.ToGuest, via))
	}
	sort.Strings(lines)
	for _, l := range lines {
		b.WriteString(l)
	}
	return []byte(b.String())
}
