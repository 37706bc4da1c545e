package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/sdpback/sockfs"
	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/virtiofs"
	"github.com/vsdp/vsdp/vhost/vsock"
)

// Config is vsdpd's configuration file (JSON).
type Config struct {
	// Provider is "auto" (rdma-core when a device exists, else soft) or
	// "soft".
	Provider string `json:"provider"`
	Fabric   Fabric `json:"fabric"`
	// Exports publish host TCP services on the host's fabric address.
	Exports []ExportConfig `json:"exports"`
	VMs     []VMConfig     `json:"vms"`
	// Sandbox is "on" (the default) or "off": in worker mode each worker
	// confines itself once its sockets exist (internal/sandbox: no file
	// opens, no exec, no new processes, no ptrace, no signals to other
	// processes). A worker that cannot confine itself fails to start
	// rather than run unconfined; "off" is the way out on a kernel
	// without seccomp filters.
	Sandbox string `json:"sandbox"`
	// WorkerGroup (a group name or number) is the group of workers that
	// run under a uid of their own (VMConfig.UID): the fabric's unix
	// endpoints between the processes become mode 0660 for it, and such
	// workers run with it as their only group. Required when a VM has a
	// uid; the run directory must let the group search it.
	WorkerGroup string `json:"worker_group,omitempty"`
	// Touch, when set, receives every copy the pure-Go provider makes to
	// or from registered memory (tests and the demo count host copies
	// with it; see VM.GuestKeys). It runs on the provider's data path:
	// it must be quick and must not call back into the daemon.
	Touch func(soft.Touch) `json:"-"`
}

// Fabric configures the soft provider's fabric (ignored by rdma-core,
// whose addressing is the IB fabric's own).
type Fabric struct {
	// Addr is the host's own fabric address (exports listen on it).
	Addr string `json:"addr"`
	// Listen is this daemon's soft transport endpoint ("tcp:HOST:PORT",
	// "unix:PATH"); empty serves nothing (single-host use).
	Listen string `json:"listen"`
	// Peers maps other hosts' fabric addresses to their endpoints.
	Peers map[string]string `json:"peers"`
}

// ExportConfig is one export.
type ExportConfig struct {
	Port   uint16 `json:"port"`
	Target string `json:"target"`
}

// VMConfig is one VM.
type VMConfig struct {
	Name   string `json:"name"`
	Socket string `json:"socket"` // vhost-user socket for vhost-user-vsock-pci
	// FSSocket, when set, serves the socket filesystem (/net) on this
	// vhost-user socket for vhost-user-fs-pci (queue-size=1024).
	FSSocket string   `json:"fs_socket"`
	CID      uint64   `json:"cid"`
	Addr     string   `json:"addr"` // the VM's fabric address
	Policy   []string `json:"policy"`
	// Listen is, in worker mode, the soft transport endpoint of this VM's
	// worker ("unix:PATH", "tcp:HOST:PORT"; default unix:RUNDIR/NAME.fabric):
	// other hosts map the VM's fabric address to it. The one-process
	// daemon ignores it (fabric.listen serves every local address).
	Listen string `json:"listen,omitempty"`
	// SocketGroup (a group name or number) may connect to the VM's
	// vhost-user sockets (mode 0660), for a QEMU running as another user
	// (libvirt's); without it they are 0600, vsdpd's user only.
	SocketGroup string `json:"socket_group,omitempty"`
	// UID, when not 0, runs the VM's worker under this uid (worker mode,
	// vsdpd running as root), one no other VM's worker shares. The
	// supervisor then creates the worker's sockets itself (owned by
	// vsdpd's user, as without UID) and hands them over as descriptors,
	// so the worker, and any other VM's worker, cannot connect to them.
	UID int `json:"uid,omitempty"`
}

// LoadConfig reads a configuration file; unknown fields are errors.
func LoadConfig(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &c, nil
}

// Daemon is a running vsdpd.
type Daemon struct {
	log      *logrus.Logger
	dev      verbs.Device
	soft     *soft.Device
	host     *sdp.Stack
	exporter *sdpback.Exporter
	vms      []*VM
	// handed are a worker's vhost-user listeners from its supervisor, by
	// path (VMConfig.UID); listen takes them.
	handed map[string]net.Listener
}

// VM is one served VM.
type VM struct {
	Name   string
	CID    uint64
	Socket string
	Back   *sdpback.VM
	stack  *sdp.Stack
	srv    *vhost.Server
	fsSrv  *vhost.Server // the socket filesystem's; nil without FSSocket
	fsSock string
	log    *logrus.Entry

	mu  sync.Mutex
	dev *vsock.Device
	fs  *sockfs.FS // the current front-end's socket filesystem
	reg *memReg
}

// memReg registers guest memory regions with the VM's protection domain,
// local access only (an rkey over guest RAM would let any fabric peer
// read or write the VM), so guest payloads are sent with no host copy.
// The tables holding registered regions stay retained, so no region is
// unmapped under its registration; everything goes when the front-end
// does.
type memReg struct {
	mu     sync.Mutex
	pd     verbs.PD
	mrs    map[*guestmem.Region]verbs.MR
	tables []*guestmem.Table
	closed bool
}

func newMemReg(pd verbs.PD) *memReg { return &memReg{pd: pd, mrs: map[*guestmem.Region]verbs.MR{}} }

// sgl describes p's segments as registered memory, or returns nil (a
// host copy, or memory that cannot be registered: the bridge copies).
func (m *memReg) sgl(p *vsock.Payload) []verbs.SGE {
	if m == nil || p.Mem == nil || p.Copied {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	out := make([]verbs.SGE, 0, len(p.Segs))
	for _, seg := range p.Segs {
		r := p.Mem.RegionOf(seg)
		if r == nil {
			return nil
		}
		mr := m.mrs[r]
		if mr == nil {
			var err error
			if mr, err = m.pd.RegMR(r.Bytes(), 0); err != nil {
				return nil
			}
			m.mrs[r] = mr
			m.tables = append(m.tables, p.Mem.Retain())
		}
		off := uint64(uintptr(unsafe.Pointer(unsafe.SliceData(seg))) - uintptr(unsafe.Pointer(unsafe.SliceData(r.Bytes()))))
		out = append(out, verbs.SGE{Addr: mr.Addr() + off, Length: uint32(len(seg)), LKey: mr.LKey()})
	}
	return out
}

// close deregisters everything. Sends still using the memory fail first:
// the caller closes the VM's streams before.
func (m *memReg) close() {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	for r, mr := range m.mrs {
		mr.Close()
		delete(m.mrs, r)
	}
	for _, t := range m.tables {
		t.Release()
	}
	m.tables = nil
}

// GuestKeys returns the local keys of the guest memory regions registered
// so far for the VM's current front-end: a provider copy record with one
// of these keys touched guest memory itself, anything else a host buffer.
func (v *VM) GuestKeys() map[uint32]bool {
	v.mu.Lock()
	reg := v.reg
	v.mu.Unlock()
	keys := map[uint32]bool{}
	if reg == nil {
		return keys
	}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, mr := range reg.mrs {
		keys[mr.LKey()] = true
	}
	return keys
}

// Device returns the VM's current vsock device (nil before QEMU connects).
func (v *VM) Device() *vsock.Device {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.dev
}

// Server returns the VM's vhost-user server.
func (v *VM) Server() *vhost.Server { return v.srv }

// Start builds everything and starts serving. Sockets are created before
// Start returns, so QEMU may be started right after.
func Start(cfg *Config, log *logrus.Logger) (_ *Daemon, err error) {
	d := &Daemon{log: log}
	defer func() {
		if err != nil {
			d.Close() // what was started so far (the returned value is nil)
		}
	}()
	hostAddr, err := netip.ParseAddr(cfg.Fabric.Addr)
	if err != nil {
		return nil, fmt.Errorf("fabric.addr: %w", err)
	}
	switch cfg.Provider {
	case "", "auto", "soft":
	default:
		return nil, fmt.Errorf("provider %q: this build supports auto and soft", cfg.Provider)
	}
	addrs := []netip.Addr{hostAddr}
	vmAddrs := make([]netip.Addr, len(cfg.VMs))
	for i, v := range cfg.VMs {
		if vmAddrs[i], err = netip.ParseAddr(v.Addr); err != nil {
			return nil, fmt.Errorf("vm %q addr: %w", v.Name, err)
		}
		if v.UID != 0 {
			return nil, fmt.Errorf("vm %q: uid needs worker mode (one process has one uid)", v.Name)
		}
		addrs = append(addrs, vmAddrs[i])
	}
	table := soft.NewTable()
	nw := soft.NewNetwork()
	opts := soft.Options{Name: "soft0", Addrs: addrs, Table: table, Network: nw, Touch: cfg.Touch}
	if cfg.Fabric.Listen != "" {
		if opts.Listen, err = soft.ParseEndpoint(cfg.Fabric.Listen); err != nil {
			return nil, err
		}
	}
	if d.soft, err = soft.Open(opts); err != nil {
		return nil, err
	}
	d.dev = d.soft
	self := d.soft.Endpoint()
	for _, a := range addrs {
		if err := table.Set(a, self); err != nil {
			return nil, err
		}
	}
	for a, ep := range cfg.Fabric.Peers {
		pa, err := netip.ParseAddr(a)
		if err != nil {
			return nil, fmt.Errorf("fabric.peers: %w", err)
		}
		e, err := soft.ParseEndpoint(ep)
		if err != nil {
			return nil, err
		}
		if err := table.Set(pa, e); err != nil {
			return nil, err
		}
	}
	if d.host, err = sdp.New(sdp.Config{Device: d.dev, Addr: hostAddr}); err != nil {
		return nil, err
	}
	d.exporter = sdpback.NewExporter(d.host)
	for _, x := range cfg.Exports {
		if err := d.exporter.Add(sdpback.Export{Port: x.Port, Target: x.Target}); err != nil {
			return nil, fmt.Errorf("export %d: %w", x.Port, err)
		}
		log.WithFields(logrus.Fields{"port": x.Port, "target": x.Target, "addr": hostAddr}).Info("export")
	}
	for i, vc := range cfg.VMs {
		v, err := d.startVM(vc, vmAddrs[i])
		if err != nil {
			return nil, fmt.Errorf("vm %q: %w", vc.Name, err)
		}
		d.vms = append(d.vms, v)
	}
	return d, nil
}

func (d *Daemon) startVM(vc VMConfig, addr netip.Addr) (*VM, error) {
	var pol sdpback.Policy
	for _, s := range vc.Policy {
		r, err := sdpback.ParseRule(s)
		if err != nil {
			return nil, err
		}
		pol = append(pol, r)
	}
	if vc.CID < 3 {
		return nil, fmt.Errorf("cid %d is reserved", vc.CID)
	}
	st, err := sdp.New(sdp.Config{Device: d.dev, Addr: addr})
	if err != nil {
		return nil, err
	}
	v := &VM{Name: vc.Name, CID: vc.CID, Socket: vc.Socket, stack: st,
		log: d.log.WithFields(logrus.Fields{"vm": vc.Name, "cid": vc.CID})}
	v.Back = sdpback.NewVM(sdpback.VMConfig{Name: vc.Name, Addr: addr, Policy: pol}, st, nil)
	limit := newLimiter(10, time.Second)
	v.srv = &vhost.Server{
		NewDevice: func() (vhost.Device, error) {
			dev, err := vsock.New(vsock.Config{CID: vc.CID}, backend{v.Back, func() *memReg { v.mu.Lock(); defer v.mu.Unlock(); return v.reg }})
			if err != nil {
				return nil, err
			}
			v.Back.Reset() // a new front-end: whatever the old guest had is gone
			v.mu.Lock()
			v.dev = dev
			v.reg.close()
			v.reg = newMemReg(st.PD())
			reg := v.reg
			v.mu.Unlock()
			v.Back.SetDevice(deviceAdapter{dev, reg})
			return dev, nil
		},
		Trace:     v.trace(limit, "vsock"),
		Exclusive: frontEndWait,
	}
	gid, err := socketGroup(vc.SocketGroup)
	if err != nil {
		st.Close()
		return nil, err
	}
	ln, err := d.listen(vc.Socket, gid)
	if err != nil {
		st.Close()
		return nil, err
	}
	go func() {
		if err := v.srv.Serve(ln); err != nil && !errors.Is(err, vhost.ErrClosed) {
			v.log.WithError(err).Error("vhost-user server stopped")
		}
	}()
	if vc.FSSocket != "" {
		fsln, err := d.listen(vc.FSSocket, gid)
		if err != nil {
			v.srv.Close()
			st.Close()
			return nil, err
		}
		v.serveFS(vc.FSSocket, fsln, limit)
	}
	v.log.WithFields(logrus.Fields{"socket": vc.Socket, "fs_socket": vc.FSSocket, "addr": addr,
		"policy": strings.TrimSpace(pol.String())}).Info("serving vm")
	return v, nil
}

// frontEndWait is how long a VM's vhost-user socket lets a new front-end
// wait for the served one to end before refusing it: one QEMU per VM, and
// whoever else can connect (a socket_group shared by every VM's QEMU, a
// worker sharing vsdpd's uid) must not take a live VM's devices.
const frontEndWait = 5 * time.Second

// serveFS serves the VM's socket filesystem on a vhost-user-fs socket.
// Each front-end gets a fresh filesystem; a ring stop or device reset ends
// the FUSE session (sockfs.Reset completes every parked request, which
// virtiofs cannot interrupt), and the next front-end's arrival closes the
// previous one's filesystem for good.
func (v *VM) serveFS(path string, ln net.Listener, limit *limiter) {
	v.fsSock = path
	v.fsSrv = &vhost.Server{
		NewDevice: func() (vhost.Device, error) {
			fs := sockfs.New(v.Back, sockfs.Options{})
			dev, err := virtiofs.New(fs, virtiofs.Options{OnStop: fs.Reset})
			if err != nil {
				fs.Close()
				return nil, err
			}
			v.mu.Lock()
			old := v.fs
			v.fs = fs
			v.mu.Unlock()
			if old != nil {
				old.Close()
			}
			return dev, nil
		},
		Trace:     v.trace(limit, "fs"),
		Exclusive: frontEndWait,
	}
	go func() {
		if err := v.fsSrv.Serve(ln); err != nil && !errors.Is(err, vhost.ErrClosed) {
			v.log.WithError(err).Error("vhost-user-fs server stopped")
		}
	}()
}

// listen returns the vhost-user listener for path: the one the supervisor
// handed over, if any (the path is then the supervisor's to create and
// remove), else a fresh socket replacing a stale one from an earlier run
// (QEMU connects to a fresh one).
func (d *Daemon) listen(path string, gid int) (net.Listener, error) {
	if ln, ok := d.handed[path]; ok {
		delete(d.handed, path)
		return ln, nil
	}
	return listenUnix(path, gid)
}

// trace logs a vhost-user server's events for device dev ("vsock", "fs");
// what a guest can trigger is rate-limited.
func (v *VM) trace(limit *limiter, dev string) func(vhost.Event) {
	return func(e vhost.Event) {
		l := v.log.WithFields(logrus.Fields{"session": e.Session, "device": dev})
		switch e.Kind {
		case vhost.EventConnect, vhost.EventDisconnect, vhost.EventRingStart, vhost.EventRingStop:
			l.Info(e.String())
		case vhost.EventRingBroken, vhost.EventRefused:
			if limit.allow() {
				l.Warn(e.String())
			}
		case vhost.EventMessage:
			if e.Err != nil && limit.allow() {
				l.Warn(e.String())
			} else {
				l.Debug(e.String())
			}
		}
	}
}

// FS returns the socket filesystem of the VM's current vhost-user-fs
// front-end (nil before one connects or without FSSocket).
func (v *VM) FS() *sockfs.FS {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.fs
}

// HostStack returns the SDP stack on the host's own fabric address (the
// exports' stack), for host programs and tests.
func (d *Daemon) HostStack() *sdp.Stack { return d.host }

// VMs returns the served VMs.
func (d *Daemon) VMs() []*VM { return d.vms }

// Exporter returns the exports server.
func (d *Daemon) Exporter() *sdpback.Exporter { return d.exporter }

// SoftDevice returns the soft verbs device (its Touch records count host
// copies).
func (d *Daemon) SoftDevice() *soft.Device { return d.soft }

// Close stops everything, VMs first.
func (d *Daemon) Close() {
	for _, ln := range d.handed { // handed over but never served
		ln.Close()
	}
	for _, v := range d.vms {
		v.srv.Close()
		if v.fsSrv != nil {
			v.fsSrv.Close()
			os.Remove(v.fsSock)
		}
		v.mu.Lock()
		fs := v.fs
		v.mu.Unlock()
		if fs != nil {
			fs.Close()
		}
		v.Back.Close()
		v.mu.Lock()
		v.reg.close()
		v.mu.Unlock()
		v.stack.Close()
		os.Remove(v.Socket)
	}
	if d.exporter != nil {
		d.exporter.Close()
	}
	if d.host != nil {
		d.host.Close()
	}
	if d.soft != nil {
		d.soft.Close()
	}
}

// backend adapts a vsock device's guest connections to sdpback.
type backend struct {
	vm  *sdpback.VM
	reg func() *memReg
}

func (b backend) Connect(r *vsock.Request) {
	b.vm.GuestConnect(r.HostPort, r.GuestPort, answer{r, b.reg()})
}

type answer struct {
	r   *vsock.Request
	reg *memReg
}

func (a answer) Accept(h sdpback.Handler) (sdpback.Stream, error) {
	c, err := a.r.Accept(stream{h, a.reg})
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (a answer) Refuse() { a.r.Refuse() }

// stream adapts an sdpback handler to a vsock stream.
type stream struct {
	h   sdpback.Handler
	reg *memReg
}

func (s stream) Deliver(p *vsock.Payload) {
	s.h.Deliver(&sdpback.Payload{Segs: p.Segs, Len: p.Len, Release: p.Release, SGL: s.reg.sgl(p)})
}
func (s stream) Pull(dst [][]byte) (int, bool)     { return s.h.Pull(dst) }
func (s stream) Shutdown(rcv, send, abortive bool) { s.h.Shutdown(rcv, send, abortive) }
func (s stream) Reset(err error)                   { s.h.Reset(err) }

type deviceAdapter struct {
	d   *vsock.Device
	reg *memReg
}

func (a deviceAdapter) Dial(guestPort uint32, h sdpback.Handler, announce func(sdpback.Stream), done func(error)) (sdpback.Stream, error) {
	c, err := a.d.DialThen(guestPort, stream{h, a.reg}, func(c *vsock.Conn) { announce(c) }, done)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// limiter is a token bucket for guest-triggerable log lines.
type limiter struct {
	mu     sync.Mutex
	tokens float64
	max    float64
	per    time.Duration
	last   time.Time
}

func newLimiter(burst int, per time.Duration) *limiter {
	return &limiter{tokens: float64(burst), max: float64(burst), per: per, last: time.Now()}
}

func (l *limiter) allow() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	l.tokens = min(l.max, l.tokens+float64(now.Sub(l.last))/float64(l.per))
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}
