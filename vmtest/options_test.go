package vmtest

import (
	"slices"
	"strings"
	"testing"

	"github.com/vsdp/vsdp/images"
)

var testPaths = paths{kernel: "/k/vmlinux", initrd: "/i/img.cpio", console: "/l/vm.console.log", qmp: "/r/qmp.sock", agent: "/r/agent.sock"}

// hasPair reports whether args holds flag followed by value.
func hasPair(args []string, flag, value string) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag && args[i+1] == value {
			return true
		}
	}
	return false
}

func TestQEMUArgs(t *testing.T) {
	base := Options{}
	base = base.withDefaults()
	tests := []struct {
		name  string
		opts  Options
		accel string
		want  [][2]string // flag, value pairs that must be present
		not   []string    // arguments that must be absent
		// flag, value pairs that must be absent
		notPairs [][2]string
	}{
		{
			name:  "defaults",
			opts:  base,
			accel: "tcg",
			want: [][2]string{
				{"-accel", "tcg"}, {"-cpu", "max"}, {"-m", "512M"}, {"-smp", "1"}, {"-machine", "pc"},
				{"-object", "memory-backend-memfd,id=mem,size=512M,share=on"}, {"-numa", "node,memdev=mem"},
				{"-display", "none"}, {"-nic", "none"},
				{"-kernel", "/k/vmlinux"}, {"-initrd", "/i/img.cpio"},
				{"-chardev", "file,id=con,path=/l/vm.console.log"}, {"-serial", "chardev:con"},
				{"-chardev", "socket,id=agent,path=/r/agent.sock,server=on,wait=off"},
				{"-device", "virtserialport,bus=vser.0,chardev=agent,name=vsdp.agent"},
				{"-qmp", "unix:/r/qmp.sock,server=on,wait=off"},
				{"-append", "console=ttyS0 panic=-1 loglevel=5 vsdp.hostname=vm"},
			},
			not: []string{"-enable-kvm"},
		},
		{
			name:  "kvm reboot smp",
			opts:  Options{Name: "k", MemoryMiB: 1024, SMP: 2, Reboot: true, Append: []string{"foo=1"}}.withDefaults(),
			accel: "kvm",
			want: [][2]string{{"-accel", "kvm"}, {"-cpu", "host"}, {"-smp", "2"}, {"-m", "1024M"},
				{"-object", "memory-backend-memfd,id=mem,size=1024M,share=on"},
				{"-append", "console=ttyS0 panic=-1 loglevel=5 vsdp.hostname=k foo=1"}},
			not: []string{"-no-reboot"},
		},
		{
			name: "user net",
			opts: Options{Name: "u", NICs: []NIC{{User: &UserNet{Forwards: []Forward{{HostPort: 8080, GuestPort: 80}, {UDP: true, HostPort: 5353, GuestPort: 53}}}}}}.withDefaults(),
			want: [][2]string{
				{"-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:5353-:53"},
			},
			notPairs: [][2]string{{"-nic", "none"}},
		},
		{
			name: "links",
			opts: Options{Name: "l", NICs: []NIC{
				{Link: &Link{Path: "/r/s.sock", Listen: true}, MAC: "52:54:00:00:00:01"},
				{Link: &Link{Kind: LinkDgram, Path: "/r/a.sock", Peer: "/r/b.sock"}},
			}}.withDefaults(),
			want: [][2]string{
				{"-netdev", "stream,id=net0,server=on,addr.type=unix,addr.path=/r/s.sock"},
				{"-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01"},
				{"-netdev", "dgram,id=net1,local.type=unix,local.path=/r/a.sock,remote.type=unix,remote.path=/r/b.sock"},
			},
		},
		{
			name: "vhost-user",
			opts: Options{Name: "v", VhostUser: []VhostUser{
				{Kind: VhostVsock, Socket: "/r/vsock.sock"},
				{Kind: VhostFS, Socket: "/r/fs.sock", Tag: "data"},
			}}.withDefaults(),
			want: [][2]string{
				{"-chardev", "socket,id=vhost0,path=/r/vsock.sock"},
				{"-device", "vhost-user-vsock-pci,chardev=vhost0"},
				{"-chardev", "socket,id=vhost1,path=/r/fs.sock"},
				{"-device", "vhost-user-fs-pci,chardev=vhost1,tag=data,queue-size=1024"},
				{"-nic", "none"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			accel := tt.accel
			if accel == "" {
				accel = "tcg"
			}
			if err := tt.opts.validate(); err != nil {
				t.Fatalf("validate: %v", err)
			}
			args := tt.opts.qemuArgs(testPaths, accel)
			for _, w := range tt.want {
				if !hasPair(args, w[0], w[1]) {
					t.Errorf("missing %s %s in\n%q", w[0], w[1], args)
				}
			}
			for _, n := range tt.notPairs {
				if hasPair(args, n[0], n[1]) {
					t.Errorf("unexpected %s %s in\n%q", n[0], n[1], args)
				}
			}
			for _, n := range tt.not {
				if slices.Contains(args, n) {
					t.Errorf("unexpected %q in\n%q", n, args)
				}
			}
			if !tt.opts.Reboot && !slices.Contains(args, "-no-reboot") {
				t.Errorf("missing -no-reboot")
			}
		})
	}
}

func TestMACsDiffer(t *testing.T) {
	a := Options{Name: "fab-a", NICs: []NIC{{}, {}}}
	b := Options{Name: "fab-b", NICs: []NIC{{}}}
	seen := map[string]bool{}
	for _, m := range []string{a.mac(0), a.mac(1), b.mac(0)} {
		if !macRE.MatchString(m) || seen[m] {
			t.Errorf("MAC %q invalid or repeated", m)
		}
		seen[m] = true
	}
}

func TestOptionsValidate(t *testing.T) {
	ok := Options{}.withDefaults()
	long := "/" + strings.Repeat("x", 120)
	tests := []struct {
		name string
		mod  func(o *Options)
		want string // substring of the error; "" means valid
	}{
		{"defaults", func(o *Options) {}, ""},
		{"bad name", func(o *Options) { o.Name = "Bad_Name" }, "name"},
		{"memory low", func(o *Options) { o.MemoryMiB = 32 }, "memory"},
		{"smp zero", func(o *Options) { o.SMP = 0 }, "smp"},
		{"smp high", func(o *Options) { o.SMP = 65 }, "smp"},
		{"negative boot timeout", func(o *Options) { o.BootTimeout = -1 }, "boot timeout"},
		{"nic none", func(o *Options) { o.NICs = []NIC{{}} }, "exactly one"},
		{"nic both", func(o *Options) { o.NICs = []NIC{{User: &UserNet{}, Link: &Link{Path: "/s"}}} }, "exactly one"},
		{"bad mac", func(o *Options) { o.NICs = []NIC{{User: &UserNet{}, MAC: "zz"}} }, "MAC"},
		{"forward port", func(o *Options) { o.NICs = []NIC{{User: &UserNet{Forwards: []Forward{{HostPort: 0, GuestPort: 1}}}}} }, "ports"},
		{"link no path", func(o *Options) { o.NICs = []NIC{{Link: &Link{}}} }, "empty socket path"},
		{"link long path", func(o *Options) { o.NICs = []NIC{{Link: &Link{Path: long}}} }, "longer"},
		{"link comma", func(o *Options) { o.NICs = []NIC{{Link: &Link{Path: "/a,b"}}} }, "comma"},
		{"stream with peer", func(o *Options) { o.NICs = []NIC{{Link: &Link{Path: "/a", Peer: "/b"}}} }, "no Peer"},
		{"dgram no peer", func(o *Options) { o.NICs = []NIC{{Link: &Link{Kind: LinkDgram, Path: "/a"}}} }, "peer"},
		{"dgram listen", func(o *Options) { o.NICs = []NIC{{Link: &Link{Kind: LinkDgram, Path: "/a", Peer: "/b", Listen: true}}} }, "does not listen"},
		{"link kind", func(o *Options) { o.NICs = []NIC{{Link: &Link{Kind: 9, Path: "/a"}}} }, "unknown link"},
		{"vhost no socket", func(o *Options) { o.VhostUser = []VhostUser{{Kind: VhostVsock}} }, "empty socket path"},
		{"vhost kind", func(o *Options) { o.VhostUser = []VhostUser{{Socket: "/s"}} }, "unknown kind"},
		{"vsock tag", func(o *Options) { o.VhostUser = []VhostUser{{Kind: VhostVsock, Socket: "/s", Tag: "x"}} }, "no tag"},
		{"fs no tag", func(o *Options) { o.VhostUser = []VhostUser{{Kind: VhostFS, Socket: "/s"}} }, "tag"},
		{"fs queue", func(o *Options) { o.VhostUser = []VhostUser{{Kind: VhostFS, Socket: "/s", Tag: "t", QueueSize: 1000}} }, "power of two"},
		{"fs ok", func(o *Options) { o.VhostUser = []VhostUser{{Kind: VhostFS, Socket: "/s", Tag: "t", QueueSize: 256}} }, ""},
		{"append newline", func(o *Options) { o.Append = []string{"a\nb"} }, "newline"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.mod(&o)
			err := o.validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("unexpected error %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("error %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}

func TestAgentSpec(t *testing.T) {
	o := Options{
		Name:      "x",
		NICs:      []NIC{{User: &UserNet{}}},
		VhostUser: []VhostUser{{Kind: VhostVsock, Socket: "/s"}, {Kind: VhostFS, Socket: "/f", Tag: "t"}},
		Image:     images.Spec{Modules: []string{"rdma_rxe"}, Init: []string{"true"}},
	}
	s := o.agentSpec()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	want := []string{"virtio_pci", "virtio_console", "virtio_net", "vmw_vsock_virtio_transport", "virtiofs", "rdma_rxe"}
	if !slices.Equal(s.Modules, want) {
		t.Errorf("modules %q, want %q", s.Modules, want)
	}
	if s.Name != "vmtest" || s.Programs[0].Package != agentPackage || s.Service[0] != agentPath {
		t.Errorf("spec %+v lacks the agent or its name", s)
	}
	if len(o.Image.Programs) != 0 {
		t.Error("agentSpec modified the options' image")
	}
}

func TestParseBW(t *testing.T) {
	out := ` #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      500              7.50               6.95   		   0.000111
`
	if bw, err := parseBW(out, 65536); err != nil || bw != 6.95 {
		t.Errorf("parseBW = %v, %v; want 6.95", bw, err)
	}
	if _, err := parseBW(out, 4096); err == nil {
		t.Error("parseBW found a row for another size")
	}
	if _, err := parseBW("garbage", 65536); err == nil {
		t.Error("parseBW accepted garbage")
	}
}
