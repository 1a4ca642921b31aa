package channel

import (
	"net"
	"time"
)

// Option tunes a channel end.
type Option func(*options)

type options struct {
	retryMin, retryMax time.Duration
	pollMin, pollMax   time.Duration
	helloInterval      time.Duration
	hello              []byte
	path               string
	peerCheck          func(net.Conn) error
}

func defaults(opts []Option) options {
	o := options{
		retryMin: 50 * time.Millisecond, retryMax: time.Second,
		pollMin: 2 * time.Millisecond, pollMax: 25 * time.Millisecond,
		helloInterval: 500 * time.Millisecond,
	}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithRetry sets how often the host resends its reset until the guest
// acknowledges it: first after min, doubling up to max.
func WithRetry(min, max time.Duration) Option {
	return func(o *options) { o.retryMin, o.retryMax = min, max }
}

// WithPoll sets how often the guest retries reading its port while the
// host side is closed: first after min, doubling up to max.
func WithPoll(min, max time.Duration) Option {
	return func(o *options) { o.pollMin, o.pollMax = min, max }
}

// WithHello sets the payload of the guest's hello (at most MaxPayload
// bytes; longer is cut), and how often it is repeated while the guest has
// no session.
func WithHello(payload []byte, interval time.Duration) Option {
	return func(o *options) {
		o.hello = payload[:min(len(payload), MaxPayload)]
		if interval > 0 {
			o.helloInterval = interval
		}
	}
}

// WithPath names the socket or device the channel runs over, for Addr.
func WithPath(path string) Option {
	return func(o *options) { o.path = path }
}

// WithPeerCheck has DialUnix check each connection (who serves the
// socket) before it is used; an error ends the dial.
func WithPeerCheck(check func(net.Conn) error) Option {
	return func(o *options) { o.peerCheck = check }
}
