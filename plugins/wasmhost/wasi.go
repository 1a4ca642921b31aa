package wasmhost

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/containerd/errdefs"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"golang.org/x/sys/unix"
)

// instantiateWASI provides WASI preview 1 to every module of rt: wazero's
// implementation, with poll_oneoff replaced by pollOneoff, and environ_get
// and environ_sizes_get by the host's own, which serve the process's
// environment as it was built once (see environ).
func instantiateWASI(ctx context.Context, rt wazero.Runtime) error {
	b := rt.NewHostModuleBuilder(wasi_snapshot_preview1.ModuleName)
	wasi_snapshot_preview1.NewFunctionExporter().ExportFunctions(b)
	i32 := api.ValueTypeI32
	b.NewFunctionBuilder().
		WithGoModuleFunction(api.GoModuleFunc(pollOneoff), []api.ValueType{i32, i32, i32, i32}, []api.ValueType{i32}).
		WithParameterNames("in", "out", "nsubscriptions", "result.nevents").
		Export("poll_oneoff")
	b.NewFunctionBuilder().
		WithGoModuleFunction(api.GoModuleFunc(environSizesGet), []api.ValueType{i32, i32}, []api.ValueType{i32}).
		WithParameterNames("result.environc", "result.environv_len").
		Export("environ_sizes_get")
	b.NewFunctionBuilder().
		WithGoModuleFunction(api.GoModuleFunc(environGet), []api.ValueType{i32, i32}, []api.ValueType{i32}).
		WithParameterNames("environ", "environ_buf").
		Export("environ_get")
	_, err := b.Instantiate(ctx)
	return err
}

// environ is a process's environment as WASI hands it to the module:
// "key=value" entries, each NUL-terminated in the module's memory.
type environ struct {
	entries [][]byte
	size    uint64 // bytes of every entry and its NUL
}

// environCheckEvery is how many variables newEnviron handles between two
// looks at its context.
const environCheckEvery = 1024

// newEnviron builds a process's environment in time linear in its size:
// later values of a name replace earlier ones (in the earlier one's
// place), entries without "=" are left out, and PWD is the working
// directory unless set (WASI has no working directory; its toolchains, Go's
// among them, take it from PWD, as a shell would set it). It stops once
// ctx is done.
func newEnviron(ctx context.Context, env []string, cwd string) (*environ, error) {
	e := &environ{entries: make([][]byte, 0, len(env)+1)}
	index := make(map[string]int, len(env))
	add := func(k, v string) {
		entry := []byte(k + "=" + v)
		if i, ok := index[k]; ok {
			e.size -= uint64(len(e.entries[i])) + 1
			e.entries[i] = entry
		} else {
			index[k] = len(e.entries)
			e.entries = append(e.entries, entry)
		}
		e.size += uint64(len(entry)) + 1
	}
	for i, kv := range env {
		if i%environCheckEvery == 0 {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("building the environment: %w", err)
			}
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		if k == "" || strings.IndexByte(kv, 0) >= 0 {
			return nil, fmt.Errorf("environment variable %q: an empty name or a NUL byte: %w", firstN(kv, 64), errdefs.ErrInvalidArgument)
		}
		add(k, v)
	}
	if _, ok := index["PWD"]; !ok {
		if cwd == "" {
			cwd = "/"
		}
		add("PWD", cwd)
	}
	if e.size > math.MaxUint32 || uint64(len(e.entries))*4 > math.MaxUint32 {
		return nil, fmt.Errorf("the environment is too large for a WebAssembly module (%d bytes): %w", e.size, errdefs.ErrInvalidArgument)
	}
	return e, nil
}

func firstN(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// processEnviron is the environment of the process calling a host
// function (none outside a process).
func processEnviron(ctx context.Context) *environ {
	if p, _ := ctx.Value(processKey{}).(*process); p != nil && p.env != nil {
		return p.env
	}
	return &environ{}
}

// environSizesGet is WASI's environ_sizes_get.
func environSizesGet(ctx context.Context, mod api.Module, stack []uint64) {
	e := processEnviron(ctx)
	mem := mod.Memory()
	count, size := uint32(stack[0]), uint32(stack[1])
	if !mem.WriteUint32Le(count, uint32(len(e.entries))) || !mem.WriteUint32Le(size, uint32(e.size)) {
		stack[0] = errnoFault
		return
	}
	stack[0] = errnoSuccess
}

// environGet is WASI's environ_get: offsets of the entries at environ,
// the NUL-terminated entries at buf.
func environGet(ctx context.Context, mod api.Module, stack []uint64) {
	e := processEnviron(ctx)
	mem := mod.Memory()
	offsets, buf := uint32(stack[0]), uint32(stack[1])
	if uint64(offsets)+4*uint64(len(e.entries)) > uint64(mem.Size()) || uint64(buf)+e.size > uint64(mem.Size()) {
		stack[0] = errnoFault
		return
	}
	at := buf
	for i, entry := range e.entries {
		if !mem.WriteUint32Le(offsets+4*uint32(i), at) || !mem.Write(at, entry) || !mem.WriteByte(at+uint32(len(entry)), 0) {
			stack[0] = errnoFault
			return
		}
		at += uint32(len(entry)) + 1
	}
	stack[0] = errnoSuccess
}

type processKey struct{}

// WASI constants of poll_oneoff.
const (
	subscriptionSize = 48
	eventSize        = 32

	eventClock   = 0
	eventFdRead  = 1
	eventFdWrite = 2

	clockAbstime = 1

	// maxSubscriptions bounds one poll (Go's runtime uses at most 65536).
	maxSubscriptions = 1 << 16

	errnoSuccess = 0
	errnoFault   = 21
	errnoInval   = 28
	errnoNotsup  = 58
)

// Pacing of polls for sockets (see pollOneoff).
const (
	minSocketPoll = 50 * time.Microsecond
	maxSocketPoll = 5 * time.Millisecond
	// busyGap: a poll arriving this soon after the last returned means the
	// module found nothing to do.
	busyGap = time.Millisecond
)

// pollOneoff is WASI's poll_oneoff. wazero's cannot wait for sockets (it
// reports every non-blocking descriptor ready at once), so a module
// waiting for connections spins a core. This one waits for the timeout of
// clock subscriptions and for stdin (really polled, and woken by a kill),
// and still reports other descriptors ready at once, but paces polls that
// follow each other with nothing done in between by a growing delay (up to
// maxSocketPoll): an idle server's CPU use stays near zero, at the cost of
// up to that much latency when it wakes.
func pollOneoff(ctx context.Context, mod api.Module, stack []uint64) {
	p, _ := ctx.Value(processKey{}).(*process)
	in, out, n, resultNevents := uint32(stack[0]), uint32(stack[1]), uint32(stack[2]), uint32(stack[3])
	stack[0] = uint64(poll(p, mod.Memory(), in, out, n, resultNevents))
}

type subscription struct {
	userdata []byte
	kind     byte
	deadline time.Time // clock
	fd       uint32    // fd_read, fd_write
}

func poll(p *process, mem api.Memory, in, out, n, resultNevents uint32) uint32 {
	if n == 0 || n > maxSubscriptions {
		return errnoInval
	}
	if uint64(in)+uint64(n)*subscriptionSize > uint64(mem.Size()) || uint64(out)+uint64(n)*eventSize > uint64(mem.Size()) {
		return errnoFault
	}
	buf, ok := mem.Read(in, n*subscriptionSize)
	if !ok {
		return errnoFault
	}
	now := time.Now()
	subs := make([]subscription, n)
	var (
		nearest      time.Time
		others, wait bool
		stdinSubs    int
	)
	for i := range subs {
		b := buf[i*subscriptionSize:]
		s := &subs[i]
		s.userdata, s.kind = b[:8], b[8]
		switch s.kind {
		case eventClock:
			timeout := time.Duration(binary.LittleEndian.Uint64(b[24:]))
			flags := binary.LittleEndian.Uint16(b[40:])
			s.deadline = now.Add(timeout)
			if flags&clockAbstime != 0 {
				clock := binary.LittleEndian.Uint32(b[16:])
				s.deadline = absDeadline(clock, uint64(timeout), now)
			}
			if nearest.IsZero() || s.deadline.Before(nearest) {
				nearest = s.deadline
			}
			wait = true
		case eventFdRead, eventFdWrite:
			s.fd = binary.LittleEndian.Uint32(b[16:])
			if s.kind == eventFdRead && s.fd == 0 && p != nil && p.stdio.pollable() {
				stdinSubs++
			} else {
				others = true
			}
		default:
			return errnoInval
		}
	}

	stdinReady := false
	switch {
	case others:
		// Reported ready at once, as wazero has no way to wait for them,
		// but only after a delay that grows while the module keeps polling
		// with nothing to do (even when a clock says not to wait).
		d := p.socketPollDelay(now)
		if stdinSubs > 0 {
			stdinReady = p.waitStdin(d)
		} else {
			p.sleep(d)
		}
	case stdinSubs > 0:
		d := time.Duration(-1)
		if wait {
			d = max(time.Until(nearest), 0)
		}
		stdinReady = p.waitStdin(d)
	case wait:
		p.sleep(time.Until(nearest))
	}
	if p != nil {
		p.lastPoll = time.Now()
	}

	now = time.Now()
	var nevents uint32
	for _, s := range subs {
		ready := false
		switch s.kind {
		case eventClock:
			ready = !now.Before(s.deadline)
		case eventFdRead, eventFdWrite:
			if s.kind == eventFdRead && s.fd == 0 && p != nil && p.stdio.pollable() {
				ready = stdinReady
			} else {
				ready = true
			}
		}
		if !ready {
			continue
		}
		ev := make([]byte, eventSize)
		copy(ev, s.userdata)
		binary.LittleEndian.PutUint16(ev[8:], errnoSuccess)
		ev[10] = s.kind
		if !mem.Write(out+nevents*eventSize, ev) {
			return errnoFault
		}
		nevents++
	}
	if !mem.WriteUint32Le(resultNevents, nevents) {
		return errnoFault
	}
	return errnoSuccess
}

// absDeadline converts an absolute WASI clock time to a deadline.
func absDeadline(clock uint32, ns uint64, now time.Time) time.Time {
	if clock == 0 { // realtime
		return time.Unix(0, int64(ns))
	}
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return now.Add(time.Duration(int64(ns) - ts.Nano()))
}

// socketPollDelay grows while the module polls with nothing to do.
func (p *process) socketPollDelay(now time.Time) time.Duration {
	if p == nil {
		return minSocketPoll
	}
	if now.Sub(p.lastPoll) > busyGap {
		p.pollDelay = 0
		return 0
	}
	p.pollDelay = min(max(2*p.pollDelay, minSocketPoll), maxSocketPoll)
	return p.pollDelay
}

func (p *process) sleep(d time.Duration) {
	if d <= 0 {
		return
	}
	if p == nil {
		time.Sleep(d)
		return
	}
	p.nanosleep(int64(d))
}

// waitStdin waits up to d (forever if negative) for stdin to be readable,
// or for the process to be killed.
func (p *process) waitStdin(d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(p.stdio.in.Fd()), Events: unix.POLLIN}}
	if p.wake >= 0 {
		fds = append(fds, unix.PollFd{Fd: int32(p.wake), Events: unix.POLLIN})
	}
	timeout := -1
	if d >= 0 {
		// Round up: poll(2) counts milliseconds, and a wait rounded down
		// to 0 would spin.
		timeout = int(min((d+time.Millisecond-1)/time.Millisecond, 1<<30))
	}
	for {
		n, err := unix.Poll(fds, timeout)
		if err == unix.EINTR {
			continue
		}
		return n > 0 && fds[0].Revents != 0
	}
}
