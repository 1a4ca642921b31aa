// Package api is the ttrpc API of kuasar-wasm-host (service
// kuasar.wasmhost.v1.WasmHost), generated from wasmhost.proto by
// `make protos`; the generated files are committed.
package api
