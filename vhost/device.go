package vhost

import (
	"fmt"

	"github.com/vsdp/vsdp/vhost/virtq"
)

// Info describes a device to the core.
type Info struct {
	Name string // for errors and traces
	// Type is the virtio device ID (19 vsock, 26 fs); informational, the
	// front-end owns the PCI identity.
	Type uint32
	// Queues is the number of rings the device serves, 1..256 (SET_VRING_*
	// indices are checked against it; GET_QUEUE_NUM reports it).
	Queues int
	// MaxQueueSize is the largest ring size accepted (a power of two; 0
	// means 32768).
	MaxQueueSize uint32
	// Features are the device's own virtio feature bits, offered beside
	// the core's VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX and
	// PROTOCOL_FEATURES.
	Features uint64
	// Config says the device has a config space: the core then offers the
	// CONFIG protocol feature and forwards GET_CONFIG/SET_CONFIG.
	Config bool
}

func (i Info) validate() error {
	switch {
	case i.Queues < 1 || i.Queues > VringIndexMask+1:
		return fmt.Errorf("%w: device %q serves %d queues, want 1..256", ErrInvalid, i.Name, i.Queues)
	case i.MaxQueueSize > virtq.MaxSize || i.MaxQueueSize&(i.MaxQueueSize-1) != 0:
		return fmt.Errorf("%w: device %q max queue size %d", ErrInvalid, i.Name, i.MaxQueueSize)
	case i.Features&FeatureProtocolFeatures != 0:
		return fmt.Errorf("%w: device %q offers bit 30, which the core owns", ErrInvalid, i.Name)
	}
	return nil
}

// Device is a virtio device served over vhost-user. The core creates one per
// front-end connection (through a Factory), negotiates for it, and hands it
// each ring once the ring is both started (it has a kick fd) and enabled.
//
// Calls come from several goroutines: the connection's message loop
// (SetFeatures, GetConfig, SetConfig, QueueStart, QueueStop, Reset, Close)
// and one goroutine per running ring (Kick, and QueueStop when that ring
// breaks). The core never calls Kick(i) concurrently with itself or with
// QueueStart(i)/QueueStop(i), but calls for different rings may overlap, so
// a device guards its own state. A device must not block in Kick for long:
// stopping a ring waits for the Kick in progress to return.
type Device interface {
	// Info is called once, when the connection starts.
	Info() Info
	// SetFeatures tells the device the acked virtio features (all of them,
	// core bits included). An error rejects SET_FEATURES.
	SetFeatures(features uint64) error
	// GetConfig fills buf from config space at offset (GET_CONFIG). An
	// access outside the config space must fail.
	GetConfig(offset uint32, buf []byte) error
	// SetConfig writes config space (SET_CONFIG; flags is ConfigWritable
	// or ConfigMigration).
	SetConfig(offset uint32, data []byte, flags uint32) error
	// QueueStart hands over a running ring. An error leaves it stopped.
	QueueStart(index int, q *virtq.Queue) error
	// Kick is called on the ring's goroutine once when it starts and then
	// after every kick. more asks to be called again at once (the device
	// bounded its work and some is left); an error breaks the ring: the
	// core stops it, signals its err eventfd and calls QueueStop.
	Kick(index int) (more bool, err error)
	// QueueStop ends the device's use of ring index: when it returns the
	// device no longer pops from q. Chains it still holds must still be
	// pushed or discarded (that only releases their memory).
	QueueStop(index int)
	// Reset returns the device to its initial state (RESET_DEVICE,
	// RESET_OWNER); every ring has been stopped before.
	Reset()
	// Close releases the device when its front-end disconnects; every ring
	// has been stopped before.
	Close() error
}

// Factory creates the Device for one front-end connection.
type Factory func() (Device, error)

// NoConfig can be embedded by devices without a config space.
type NoConfig struct{}

// GetConfig implements Device; it always fails.
func (NoConfig) GetConfig(offset uint32, buf []byte) error {
	return fmt.Errorf("%w: device has no config space", ErrUnsupported)
}

// SetConfig implements Device; it always fails.
func (NoConfig) SetConfig(offset uint32, data []byte, flags uint32) error {
	return fmt.Errorf("%w: device has no config space", ErrUnsupported)
}
