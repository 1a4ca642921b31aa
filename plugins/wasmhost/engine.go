package wasmhost

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	godigest "github.com/opencontainers/go-digest"
	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"golang.org/x/sync/semaphore"
)

// engine compiles modules once per node and shares the compiled code among
// every instance of them.
//
// What a hostile or broken module can cost the host is bounded: at most
// maxCompiles modules compile at once, the code of modules being read or
// compiled never holds more than the memory budget, and a panic of the
// compiler is that module's error.
type engine struct {
	rt wazero.Runtime
	// keepUnused compiled modules stay in memory when no instance uses them,
	// so that the next pod of the same image starts warm.
	keepUnused int
	// compileFn compiles code (the runtime's compiler).
	compileFn func(context.Context, []byte) (wazero.CompiledModule, error)
	// slots bounds concurrent compiles; budget the bytes of module code
	// held in memory to be compiled.
	slots     chan struct{}
	budget    *semaphore.Weighted
	budgetMax int64
	compiling atomic.Int32

	mu      sync.Mutex
	modules map[string]*compiled // by digest
	unused  *list.List           // of *compiled, least recently used first
}

// compiled is a compiled module and how many instances use it.
type compiled struct {
	digest   string
	cm       wazero.CompiledModule
	refs     int
	elem     *list.Element // in engine.unused while refs == 0
	ready    chan struct{} // closed once cm or err is set
	err      error
	hasStart bool
}

// engineLimits bound the compiler's use of the host.
type engineLimits struct {
	maxCompiles   int   // concurrent compiles (0: one per CPU)
	compileMemory int64 // bytes of module code in memory at once (0: defaultCompileMemory)
}

// defaultCompileMemory lets two modules of the largest size be read and
// compiled at once, or many small ones.
const defaultCompileMemory = 2 * MaxModuleSize

// newEngine returns an engine that caches compiled code in cacheDir ("":
// memory only) across host restarts.
func newEngine(ctx context.Context, cacheDir string, keepUnused int, lim engineLimits) (*engine, error) {
	cfg := wazero.NewRuntimeConfigCompiler().
		// Loops and calls check whether the module was closed, so that a
		// runaway module can be stopped, and yield to the Go scheduler.
		WithCloseOnContextDone(true)
	if cacheDir != "" {
		cache, err := wazero.NewCompilationCacheWithDir(cacheDir)
		if err != nil {
			return nil, fmt.Errorf("compilation cache %s: %w", cacheDir, err)
		}
		cfg = cfg.WithCompilationCache(cache)
	}
	rt := wazero.NewRuntimeWithConfig(ctx, cfg)
	if err := instantiateWASI(ctx, rt); err != nil {
		rt.Close(ctx)
		return nil, fmt.Errorf("instantiating WASI: %w", err)
	}
	if lim.maxCompiles <= 0 {
		lim.maxCompiles = runtime.NumCPU()
	}
	if lim.compileMemory <= 0 {
		lim.compileMemory = defaultCompileMemory
	}
	return &engine{
		rt:         rt,
		keepUnused: keepUnused,
		compileFn:  rt.CompileModule,
		slots:      make(chan struct{}, lim.maxCompiles),
		budget:     semaphore.NewWeighted(lim.compileMemory),
		budgetMax:  lim.compileMemory,
		modules:    map[string]*compiled{},
		unused:     list.New(),
	}, nil
}

// Digest returns the content digest of a module, as images name it.
func Digest(code []byte) string {
	sum := sha256.Sum256(code)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// hostModules are the import modules the host provides.
var hostModules = map[string]bool{wasi_snapshot_preview1.ModuleName: true}

// reserve holds n bytes of the memory budget for module code until release
// is called, waiting (within ctx) for others to release theirs.
func (e *engine) reserve(ctx context.Context, n int64) (release func(), err error) {
	n = max(n, 1)
	if n > e.budgetMax {
		return nil, fmt.Errorf("module of %d bytes is over the host's compile memory of %d: %w", n, e.budgetMax, errdefs.ErrInvalidArgument)
	}
	if err := e.budget.Acquire(ctx, n); err != nil {
		return nil, fmt.Errorf("waiting for memory to read the module: %w", err)
	}
	var once sync.Once
	return func() { once.Do(func() { e.budget.Release(n) }) }, nil
}

// acquire returns the compiled module of digest, compiling what load
// returns when it is not in memory. Each acquire is paired with a release.
// load must hold the code's bytes in the budget (see reserve and
// readModule) until its release is called, which the engine does once the
// code is compiled.
//
// A caller whose ctx is done stops waiting; a compile that has begun goes
// on without it (wazero's compiler cannot be interrupted) and its result
// is kept for the next caller, such as the kubelet's next attempt.
func (e *engine) acquire(ctx context.Context, digest string, load func(context.Context) ([]byte, func(), error)) (*compiled, error) {
	for {
		e.mu.Lock()
		c, ok := e.modules[digest]
		if !ok {
			c = &compiled{digest: digest, ready: make(chan struct{})}
			e.modules[digest] = c
			go e.build(ctx, c, load)
		}
		if c.elem != nil {
			e.unused.Remove(c.elem)
			c.elem = nil
		}
		c.refs++
		e.mu.Unlock()
		select {
		case <-c.ready:
		case <-ctx.Done():
			e.release(c)
			return nil, ctx.Err()
		}
		if c.err == nil {
			return c, nil
		}
		e.release(c)
		if !isContextError(c.err) {
			return nil, c.err
		}
		// The caller who began it gave up before it was compiled; begin
		// again, for this caller.
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// build compiles c, then hands it to the callers waiting for it, or keeps
// it among the unused modules if they all left.
func (e *engine) build(ctx context.Context, c *compiled, load func(context.Context) ([]byte, func(), error)) {
	cm, hasStart, err := e.compile(ctx, c.digest, load)
	e.mu.Lock()
	c.cm, c.hasStart, c.err = cm, hasStart, err
	if err != nil {
		delete(e.modules, c.digest)
	}
	close(c.ready)
	e.mu.Unlock()
	if err == nil {
		// Held by nobody if its callers gave up: kept as unused.
		e.hold(c)
		e.release(c)
	}
}

func isContextError(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// compile loads, checks and compiles a module, in a compile slot.
func (e *engine) compile(ctx context.Context, digest string, load func(context.Context) ([]byte, func(), error)) (wazero.CompiledModule, bool, error) {
	code, done, err := load(ctx)
	if err != nil {
		return nil, false, err
	}
	defer done()
	if d, err := godigest.Parse(digest); err != nil || d.Algorithm().FromBytes(code) != d {
		return nil, false, fmt.Errorf("module content does not match digest %s: %w", digest, errdefs.ErrInvalidArgument)
	}
	select {
	case e.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, false, fmt.Errorf("waiting to compile the module: %w", ctx.Err())
	}
	defer func() { <-e.slots }()
	e.compiling.Add(1)
	defer e.compiling.Add(-1)
	// Compile on a thread of the host's (the caller may be a container's
	// thread, which no longer sees the compilation cache); a panic of the
	// compiler is this module's error, not the end of the host.
	type result struct {
		cm       wazero.CompiledModule
		hasStart bool
		err      error
	}
	out := make(chan result, 1)
	go func() {
		var r result
		defer func() {
			if p := recover(); p != nil {
				log.G(ctx).WithField("digest", digest).WithField("panic", p).WithField("stack", string(debug.Stack())).
					Error("compiling a module panicked")
				if r.cm != nil {
					_ = r.cm.Close(context.Background())
				}
				r = result{err: fmt.Errorf("invalid WebAssembly module: the compiler failed on it (%v): %w", p, errdefs.ErrInvalidArgument)}
			}
			out <- r
		}()
		cm, err := e.compileFn(ctx, code)
		if err != nil {
			r.err = fmt.Errorf("invalid WebAssembly module: %v: %w", err, errdefs.ErrInvalidArgument)
			return
		}
		r.cm = cm
		if r.hasStart, r.err = check(cm); r.err != nil {
			_ = cm.Close(context.Background())
			r.cm = nil
		}
	}()
	r := <-out
	if r.err == nil {
		log.G(ctx).WithField("digest", digest).WithField("size", len(code)).Debug("compiled module")
	}
	return r.cm, r.hasStart, r.err
}

// check refuses modules the host cannot run: imports it does not provide,
// or no WASI command entry point.
func check(cm wazero.CompiledModule) (bool, error) {
	var missing []string
	for _, f := range cm.ImportedFunctions() {
		mod, name, _ := f.Import()
		if !hostModules[mod] {
			missing = append(missing, mod+"."+name)
		}
	}
	for _, m := range cm.ImportedMemories() {
		mod, name, _ := m.Import()
		missing = append(missing, mod+"."+name+" (memory)")
	}
	if len(missing) > 0 {
		if len(missing) > 5 {
			missing = append(missing[:5], fmt.Sprintf("and %d more", len(missing)-5))
		}
		return false, fmt.Errorf("module imports what the host does not provide (only WASI preview 1 is): %s: %w",
			strings.Join(missing, ", "), errdefs.ErrInvalidArgument)
	}
	if _, ok := cm.ExportedFunctions()["_start"]; !ok {
		return false, fmt.Errorf("module exports no _start function: not a WASI command module: %w", errdefs.ErrInvalidArgument)
	}
	return true, nil
}

// hold adds a reference to an acquired module.
func (e *engine) hold(c *compiled) {
	e.mu.Lock()
	c.refs++
	e.mu.Unlock()
}

// release drops a reference; unused modules beyond keepUnused are closed,
// least recently used first.
func (e *engine) release(c *compiled) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c.refs--
	if c.refs > 0 || c.err != nil || c.cm == nil {
		return
	}
	c.elem = e.unused.PushBack(c)
	closed := false
	for e.unused.Len() > e.keepUnused {
		old := e.unused.Remove(e.unused.Front()).(*compiled)
		old.elem = nil
		delete(e.modules, old.digest)
		if err := old.cm.Close(context.Background()); err != nil {
			log.L.WithError(err).Debug("closing compiled module")
		}
		closed = true
	}
	if closed {
		// Compiled code is large (several times the module): give the
		// memory back to the node now rather than whenever it is asked.
		go debug.FreeOSMemory()
	}
}

// count returns how many compiled modules are in memory.
func (e *engine) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.modules)
}

func (e *engine) close(ctx context.Context) error {
	return e.rt.Close(ctx)
}
