package vmtest

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/vsdp/vsdp/images"
)

// Options describe a VM. The zero value is a 512 MiB, one-CPU guest with no
// network, running the agent and nothing else.
type Options struct {
	// Name names the VM: its hostname and its log files. Default "vm".
	Name string
	// MemoryMiB is the guest memory (shared memfd). Default 512.
	MemoryMiB int
	// SMP is the number of vCPUs. Default 1.
	SMP int
	// Image adds to the guest image: modules, programs, files, Init lines.
	// Its Name and Service are set by vmtest (the agent is the service).
	Image images.Spec
	// NICs are the guest's network cards, eth0 first. None: -nic none.
	NICs []NIC
	// VhostUser are vhost-user devices pointed at back-end sockets.
	VhostUser []VhostUser
	// Append is added to the kernel command line.
	Append []string
	// QEMUArgs are added to QEMU's arguments as they are.
	QEMUArgs []string
	// Reboot lets a guest reboot (no -no-reboot).
	Reboot bool
	// BootTimeout bounds the wait for the agent. Default 90 s (TCG, with
	// two guests sharing two cores).
	BootTimeout time.Duration
	// LogDir is where the console and QEMU logs go (NAME.console.log,
	// NAME.qemu.log). Default build/vmtest/logs; Start uses the test's own.
	LogDir string

	accel string // set by the KVM probe itself
}

// NIC is a virtio-net card with one back-end: exactly one of User, Link.
type NIC struct {
	MAC  string   // default derived from the VM name and NIC index
	User *UserNet // QEMU user networking (slirp), isolated
	Link *Link    // a point-to-point link to another guest
}

// UserNet is slirp with restrict=on: the guest reaches nothing outside; the
// host reaches the guest through forwards bound to 127.0.0.1, and the guest
// reaches the host only through GuestForwards.
type UserNet struct {
	Forwards      []Forward
	GuestForwards []GuestForward
}

// GuestForward lets the guest reach one host TCP service through slirp
// (guestfwd, which restrict=on allows): a connection to Addr:Port in the
// guest reaches 127.0.0.1:HostPort on the host. QEMU spawns a relay (socat,
// which must be installed) per connection, so each guest connection is its
// own host connection.
type GuestForward struct {
	Addr     string // in slirp's 10.0.2.0/24; default GuestForwardAddr
	Port     int
	HostPort int
}

// GuestForwardAddr is GuestForward's default guest-side address.
const GuestForwardAddr = "10.0.2.100"

// guestForwardRE accepts an address in slirp's default network.
var guestForwardRE = regexp.MustCompile(`^10\.0\.2\.([0-9]{1,3})$`)

// Forward forwards 127.0.0.1:HostPort on the host to GuestPort in the guest.
type Forward struct {
	UDP       bool
	HostPort  int
	GuestPort int
}

// LinkKind is the transport of a guest-to-guest link.
type LinkKind int

// Link kinds.
const (
	// LinkStream is `-netdev stream` over a Unix socket: reliable, no
	// Nagle (the TCP form of the socket netdev adds ~22 ms per exchange).
	LinkStream LinkKind = iota
	// LinkDgram is `-netdev dgram` over Unix datagram sockets.
	LinkDgram
)

func (k LinkKind) String() string {
	switch k {
	case LinkStream:
		return "stream"
	case LinkDgram:
		return "dgram"
	}
	return fmt.Sprintf("LinkKind(%d)", int(k))
}

// Link joins two guests. For LinkStream one side listens on Path and the
// other connects to it (start the listener first). For LinkDgram each side
// binds Path and sends to Peer.
type Link struct {
	Kind   LinkKind
	Path   string // stream: the socket; dgram: this side's socket
	Peer   string // dgram only: the other side's socket
	Listen bool   // stream only: this side listens
}

// VhostKind is a vhost-user device type.
type VhostKind int

// Vhost-user device kinds.
const (
	VhostVsock VhostKind = iota + 1 // vhost-user-vsock-pci
	VhostFS                         // vhost-user-fs-pci
)

// VhostUser is a vhost-user device; QEMU connects to Socket as a client
// (the back-end must be listening before the VM starts).
type VhostUser struct {
	Kind      VhostKind
	Socket    string
	Tag       string // VhostFS: the mount tag
	QueueSize int    // VhostFS: default 1024
}

var vmNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

func (o Options) withDefaults() Options {
	c := o
	if c.Name == "" {
		c.Name = "vm"
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 512
	}
	if c.SMP == 0 {
		c.SMP = 1
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 90 * time.Second
	}
	return c
}

func (o *Options) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("vmtest: options: "+format, a...)
	}
	switch {
	case !vmNameRE.MatchString(o.Name):
		return bad("name %q must match %s", o.Name, vmNameRE)
	case o.MemoryMiB < 64 || o.MemoryMiB > 64<<10:
		return bad("memory %d MiB outside [64, 65536]", o.MemoryMiB)
	case o.SMP < 1 || o.SMP > 64:
		return bad("smp %d outside [1, 64]", o.SMP)
	case o.BootTimeout < 0:
		return bad("negative boot timeout")
	}
	for i, n := range o.NICs {
		if (n.User == nil) == (n.Link == nil) {
			return bad("nics[%d]: exactly one of User, Link", i)
		}
		if n.MAC != "" && !macRE.MatchString(n.MAC) {
			return bad("nics[%d]: bad MAC %q", i, n.MAC)
		}
		if u := n.User; u != nil {
			for _, f := range u.Forwards {
				if f.HostPort < 1 || f.HostPort > 65535 || f.GuestPort < 1 || f.GuestPort > 65535 {
					return bad("nics[%d]: forward ports %d->%d out of range", i, f.HostPort, f.GuestPort)
				}
			}
			for _, g := range u.GuestForwards {
				if g.Port < 1 || g.Port > 65535 || g.HostPort < 1 || g.HostPort > 65535 {
					return bad("nics[%d]: guest forward ports %d->%d out of range", i, g.Port, g.HostPort)
				}
				if m := guestForwardRE.FindStringSubmatch(g.Addr); g.Addr != "" && (m == nil || len(m[1]) > 1 && m[1][0] == '0' || atoi(m[1]) > 254 || atoi(m[1]) < 4) {
					return bad("nics[%d]: guest forward address %q not a free host of 10.0.2.0/24", i, g.Addr)
				}
			}
			if len(u.GuestForwards) > 0 {
				if _, err := exec.LookPath("socat"); err != nil {
					return fmt.Errorf("%w: guest forwards need socat: %v", ErrSetup, err)
				}
			}
		}
		if l := n.Link; l != nil {
			if err := checkSocketPath(l.Path); err != nil {
				return bad("nics[%d]: %v", i, err)
			}
			switch l.Kind {
			case LinkStream:
				if l.Peer != "" {
					return bad("nics[%d]: a stream link has no Peer", i)
				}
			case LinkDgram:
				if err := checkSocketPath(l.Peer); err != nil {
					return bad("nics[%d]: peer: %v", i, err)
				}
				if l.Listen {
					return bad("nics[%d]: a dgram link does not listen", i)
				}
			default:
				return bad("nics[%d]: unknown link kind %v", i, l.Kind)
			}
		}
	}
	for i, v := range o.VhostUser {
		if err := checkSocketPath(v.Socket); err != nil {
			return bad("vhost_user[%d]: %v", i, err)
		}
		switch v.Kind {
		case VhostVsock:
			if v.Tag != "" || v.QueueSize != 0 {
				return bad("vhost_user[%d]: vsock takes no tag or queue size", i)
			}
		case VhostFS:
			if v.Tag == "" || len(v.Tag) > 36 || strings.ContainsAny(v.Tag, ", \t\n") {
				return bad("vhost_user[%d]: bad tag %q", i, v.Tag)
			}
			if q := v.QueueSize; q != 0 && (q < 2 || q > 1024 || q&(q-1) != 0) {
				return bad("vhost_user[%d]: queue size %d not a power of two in [2, 1024]", i, q)
			}
		default:
			return bad("vhost_user[%d]: unknown kind %d", i, v.Kind)
		}
	}
	for _, a := range o.Append {
		if strings.ContainsAny(a, "\n\x00") {
			return bad("append %q holds a newline or NUL", a)
		}
	}
	return nil
}

// atoi converts a short run of digits.
func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

var macRE = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)

// checkSocketPath accepts a path that fits a sockaddr_un and QEMU's option
// syntax (no commas).
func checkSocketPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("empty socket path")
	case len(p) > 107:
		return fmt.Errorf("socket path %q longer than 107 bytes", p)
	case strings.ContainsAny(p, ",\n\x00"):
		return fmt.Errorf("socket path %q holds a comma, newline or NUL", p)
	}
	return nil
}

// modules returns the modules the agent and the devices need, before the
// image's own.
func (o *Options) modules() []string {
	m := []string{"virtio_pci", "virtio_console"}
	if len(o.NICs) > 0 {
		m = append(m, "virtio_net")
	}
	for _, v := range o.VhostUser {
		switch v.Kind {
		case VhostVsock:
			m = append(m, "vmw_vsock_virtio_transport")
		case VhostFS:
			m = append(m, "virtiofs")
		}
	}
	return append(m, o.Image.Modules...)
}

// mac returns NIC i's MAC address: locally administered, unique per VM
// name and index.
func (o *Options) mac(i int) string {
	if o.NICs[i].MAC != "" {
		return o.NICs[i].MAC
	}
	var h uint32 = 2166136261
	for _, c := range []byte(o.Name) {
		h = (h ^ uint32(c)) * 16777619
	}
	return fmt.Sprintf("52:54:%02x:%02x:%02x:%02x", byte(h>>16), byte(h>>8), byte(h), byte(i))
}

// paths are the files of one running VM.
type paths struct {
	kernel  string
	initrd  string
	console string
	qmp     string
	agent   string
}

// qemuArgs returns QEMU's arguments (without the binary).
func (o *Options) qemuArgs(p paths, accel string) []string {
	mem := fmt.Sprintf("%dM", o.MemoryMiB)
	cpu := "max"
	if accel == "kvm" {
		cpu = "host"
	}
	cmdline := append([]string{"console=ttyS0", "panic=-1", "loglevel=5", images.HostnameParam + "=" + o.Name}, o.Append...)
	a := []string{
		"-name", o.Name,
		"-nodefaults", "-no-user-config",
		"-machine", "pc",
		"-accel", accel,
		"-cpu", cpu,
		"-smp", fmt.Sprint(o.SMP),
		"-m", mem,
		"-object", "memory-backend-memfd,id=mem,size=" + mem + ",share=on",
		"-numa", "node,memdev=mem",
		"-display", "none",
		"-kernel", p.kernel,
		"-initrd", p.initrd,
		"-append", strings.Join(cmdline, " "),
		"-chardev", "file,id=con,path=" + p.console,
		"-serial", "chardev:con",
		// The agent's channel: a virtio-serial port (a 16550 moves well
		// under 100 KiB/s under TCG).
		"-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=agent,path=" + p.agent + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser.0,chardev=agent,name=" + agentPortName,
		"-qmp", "unix:" + p.qmp + ",server=on,wait=off",
	}
	if !o.Reboot {
		a = append(a, "-no-reboot")
	}
	if len(o.NICs) == 0 {
		a = append(a, "-nic", "none")
	}
	for i, n := range o.NICs {
		id := fmt.Sprintf("net%d", i)
		switch {
		case n.User != nil:
			nd := "user,id=" + id + ",restrict=on"
			for _, f := range n.User.Forwards {
				proto := "tcp"
				if f.UDP {
					proto = "udp"
				}
				nd += fmt.Sprintf(",hostfwd=%s:127.0.0.1:%d-:%d", proto, f.HostPort, f.GuestPort)
			}
			for _, g := range n.User.GuestForwards {
				addr := g.Addr
				if addr == "" {
					addr = GuestForwardAddr
				}
				nd += fmt.Sprintf(",guestfwd=tcp:%s:%d-cmd:socat STDIO TCP:127.0.0.1:%d", addr, g.Port, g.HostPort)
			}
			a = append(a, "-netdev", nd)
		case n.Link != nil && n.Link.Kind == LinkStream:
			a = append(a, "-netdev", fmt.Sprintf("stream,id=%s,server=%s,addr.type=unix,addr.path=%s",
				id, onOff(n.Link.Listen), n.Link.Path))
		case n.Link != nil && n.Link.Kind == LinkDgram:
			a = append(a, "-netdev", fmt.Sprintf("dgram,id=%s,local.type=unix,local.path=%s,remote.type=unix,remote.path=%s",
				id, n.Link.Path, n.Link.Peer))
		}
		a = append(a, "-device", fmt.Sprintf("virtio-net-pci,netdev=%s,mac=%s", id, o.mac(i)))
	}
	for i, v := range o.VhostUser {
		id := fmt.Sprintf("vhost%d", i)
		a = append(a, "-chardev", "socket,id="+id+",path="+v.Socket)
		switch v.Kind {
		case VhostVsock:
			a = append(a, "-device", "vhost-user-vsock-pci,chardev="+id)
		case VhostFS:
			q := v.QueueSize
			if q == 0 {
				q = 1024
			}
			a = append(a, "-device", fmt.Sprintf("vhost-user-fs-pci,chardev=%s,tag=%s,queue-size=%d", id, v.Tag, q))
		}
	}
	return append(a, o.QEMUArgs...)
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// agentSpec returns the image spec: the options' image plus the agent, the
// device modules and the VM name.
func (o *Options) agentSpec() *images.Spec {
	s := o.Image
	// One image name for all VMs: VMs that differ only in name (the
	// hostname comes from the kernel command line) share an image.
	s.Name = "vmtest"
	s.Modules = o.modules()
	s.Programs = append([]images.Program{{Package: agentPackage, Path: agentPath}}, s.Programs...)
	s.Service = []string{agentPath, "-port", agentPortName}
	return &s
}

const (
	agentPackage = "github.com/vsdp/vsdp/vmtest/agent"
	agentPath    = "/sbin/vsdp-agent"
	// agentPortName names the agent's virtio-serial port; the agent finds
	// its device node through /sys/class/virtio-ports.
	agentPortName = "vsdp.agent"
)

// logPaths returns the console and QEMU log paths of a VM in dir.
func logPaths(dir, name string) (console, qemu string) {
	return filepath.Join(dir, name+".console.log"), filepath.Join(dir, name+".qemu.log")
}
