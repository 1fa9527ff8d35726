"""The host side of the Metal backend agrees with shaders/ and with torch, checked on Linux so a renamed
kernel, a reordered parameter struct, a changed tile constant or a torch API change fails CI here and
not only on a Mac.

Every kernel the MPS kernels can launch is named by a plan function of metal_marlin/ops (the ObjC++
dispatch in csrc/metal/ encodes whatever name it is given and names none itself). Each ops module lists
the names its plans produce in ``METAL_KERNELS``; the plans build them with the same functions.

The dispatch sources (compiled only on macOS) are parsed here with clang: the Objective-C++ against
torch's real ATen/MPS headers and the declarations below of the Metal, Foundation and libdispatch calls
it makes, written from Apple's documentation. That checks its C++ and its use of torch, not the Metal
API itself, which only a Mac build checks.
"""

import ast
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import nanobind
import pytest
import torch

from metal_marlin.ops import attention, experts, group_matmul, trellis
from metal_marlin.ops.metal import ParamsStruct
from tests.mslsim import compile_metal

ROOT = Path(__file__).resolve().parents[2]
SHADERS = ROOT / "shaders"
OPS_MODULES = (group_matmul, trellis, experts, attention)

# Python launch constants -> their value in the shaders (a constant name, or a function of them).
LAUNCH_CONSTANTS = {
    (group_matmul, "QUANT_GEMV_ROWS"): "QUANT_GEMV_ROWS",
    (group_matmul, "QUANT_GEMV_MAX_M"): "QUANT_GEMV_MAX_M",
    (group_matmul, "QUANT_GEMV_THREADS"): "QUANT_GEMV_THREADS",
    (group_matmul, "QUANT_GEMM_BM"): "QUANT_GEMM_BM",
    (group_matmul, "QUANT_GEMM_BN"): "QUANT_GEMM_BN",
    (group_matmul, "QUANT_GEMM_THREADS"): "QUANT_GEMM_THREADS",
    (trellis, "HADAMARD_THREADS"): "kHadamardThreads",
    (trellis, "HADAMARD_CHUNK"): "kHadamardChunk",
    (trellis, "TRELLIS_THREADS"): lambda c: 32 * c["kGemvSimdgroups"],
    (trellis, "TRELLIS_GEMV_MAX_M"): "kGemvMaxRows",
    (trellis, "TRELLIS_GEMM_BM"): "kGemmRows",
    (trellis, "TRELLIS_GEMM_BN"): "kGemmCols",
    (experts, "MOE_MAX_EXPERTS"): "MOE_MAX_EXPERTS",
    (experts, "MOE_ROUTE_THREADS"): "MOE_ROUTE_THREADS",
    (experts, "MOE_COMBINE_THREADS"): "MOE_COMBINE_THREADS",
    (experts, "MOE_THREADS"): "MOE_THREADS",
    (experts, "MOE_GEMV_ROWS"): "MOE_GEMV_ROWS",
    (experts, "MOE_GEMV_GATE_UP_FEATURES"): "MOE_GEMV_GATE_UP_FEATURES",
    (experts, "MOE_GEMV_DOWN_FEATURES"): "MOE_GEMV_DOWN_FEATURES",
    (experts, "MOE_GEMM_BM"): "MOE_GEMM_BM",
    (experts, "MOE_GEMM_BN"): "MOE_GEMM_BN",
    (attention, "GQA_DECODE_HEADS"): "GQA_DECODE_HEADS",
    (attention, "GQA_DECODE_THREADS"): "GQA_DECODE_THREADS",
    (attention, "MLA_DECODE_HEADS"): "MLA_DECODE_HEADS",
    (attention, "MLA_DECODE_THREADS"): "MLA_DECODE_THREADS",
    (attention, "FLASH_PREFILL_BQ"): "FLASH_PREFILL_BQ",
    (attention, "FLASH_PREFILL_THREADS"): "FLASH_PREFILL_THREADS",
}


def shader_sources() -> dict[str, str]:
    """Every shader file's text with comments removed."""
    return {path.name: re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)
            for path in sorted([*SHADERS.glob("*.metal"), *SHADERS.glob("*.h")])}


def _evaluate(expression: str, known: dict[str, int]) -> int:
    """An integer constant expression of literals, known names, + - * / and parentheses."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return known[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
            left, right = value(node.left), value(node.right)
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right,
                    ast.FloorDiv: left // right}[type(node.op)]
        raise ValueError(f"not a constant expression: {expression}")
    return value(ast.parse(re.sub(r"(\d+)u\b", r"\1", expression).replace("/", "//"), mode="eval").body)


def shader_constants() -> dict[str, int]:
    """``NAME = value`` of the ``enum : uint {...}`` blocks and ``constant constexpr uint`` declarations."""
    constants: dict[str, int] = {}
    for text in shader_sources().values():
        declarations = [(name, expression) for body in re.findall(r"enum\s*:\s*uint\s*\{(.*?)\}", text, flags=re.S)
                        for name, expression in re.findall(r"(\w+)\s*=\s*([^,]+)", body)]
        declarations += re.findall(r"constant\s+constexpr\s+uint\s+(\w+)\s*=\s*([^;]+);", text)
        for name, expression in declarations:
            try:
                constants[name] = _evaluate(expression.strip(), constants)
            except (KeyError, ValueError, SyntaxError):
                continue  # depends on a template parameter (the format traits' BITS = B): not a launch constant
    return constants


def shader_structs() -> dict[str, tuple[tuple[str, str], ...]]:
    """``struct Name { type field; ... };`` -> ((type, field), ...) in declaration order."""
    structs = {}
    for text in shader_sources().values():
        for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
            fields = []
            for kind, names in re.findall(r"(\w+)\s+([\w\s,]+);", body):
                fields += [(kind, field.strip()) for field in names.split(",")]
            structs[name] = tuple(fields)
    return structs


@pytest.fixture(scope="module")
def library_kernels() -> set[str]:
    """Host names of every kernel in shaders/*.metal, as the MSL simulator compiles them."""
    return {name for path in sorted(SHADERS.glob("*.metal")) for name in compile_metal(path).kernel_names}


def host_kernels() -> dict[str, str]:
    return {name: module.__name__ for module in OPS_MODULES for name in module.METAL_KERNELS}


@pytest.mark.parametrize("kernel", sorted(host_kernels()))
def test_every_kernel_the_host_launches_is_in_the_library(library_kernels, kernel):
    assert kernel in library_kernels, f"{host_kernels()[kernel]} launches {kernel}, which shaders/ does not define"


def test_every_kernel_of_the_library_has_a_host_path(library_kernels):
    assert sorted(library_kernels - set(host_kernels())) == []


def test_the_objcxx_dispatch_names_no_kernel():
    """Kernel names live in the plans only, so the checks above see all of them."""
    names = set(host_kernels())
    for source in sorted((ROOT / "csrc" / "metal").glob("*")):
        literals = set(re.findall(r'"([A-Za-z0-9_]+)"', source.read_text()))
        assert not literals & names, f"{source.name} names kernels {sorted(literals & names)}"


PARAMS_STRUCTS = [(module.__name__, value) for module in OPS_MODULES for value in vars(module).values()
                  if isinstance(value, ParamsStruct)]


@pytest.mark.parametrize("module, params", PARAMS_STRUCTS, ids=[p.name for _, p in PARAMS_STRUCTS])
def test_params_structs_match_the_shaders(module, params):
    structs = shader_structs()
    assert params.name in structs, f"{module}.{params.name} is not a struct of shaders/"
    assert params.fields == structs[params.name]


def test_every_shader_params_struct_has_a_host_declaration():
    launched = {params.name for _, params in PARAMS_STRUCTS}
    declared = {name for name in shader_structs() if name.endswith("Params")}
    assert sorted(declared - launched) == []


@pytest.mark.parametrize("key", list(LAUNCH_CONSTANTS), ids=[f"{m.__name__}.{n}" for m, n in LAUNCH_CONSTANTS])
def test_launch_constants_match_the_shaders(key):
    constants = shader_constants()
    module, name = key
    expected = LAUNCH_CONSTANTS[key]
    assert getattr(module, name) == (constants[expected] if isinstance(expected, str) else expected(constants))


# Declarations of the SDK calls csrc/metal/metal_runtime.mm and torch's MPS headers use (nothing else).
APPLE_DECLARATIONS = {
    "dispatch/dispatch.h": """
#pragma once
@protocol OS_dispatch_queue
@end
typedef id<OS_dispatch_queue> dispatch_queue_t;
typedef void (^dispatch_block_t)(void);
extern "C" void dispatch_sync(dispatch_queue_t queue, dispatch_block_t block);
""",
    "Foundation/Foundation.h": """
#pragma once
#include <dispatch/dispatch.h>
#define nil nullptr
typedef unsigned long NSUInteger;
@protocol NSObject
- (oneway void)release;
- (instancetype)retain;
@end
__attribute__((objc_root_class)) @interface NSObject <NSObject>
@end
typedef struct { unsigned long state; id* itemsPtr; unsigned long* mutationsPtr; unsigned long extra[5]; }
    NSFastEnumerationState;
@protocol NSFastEnumeration
- (NSUInteger)countByEnumeratingWithState:(NSFastEnumerationState*)state objects:(id*)buffer count:(NSUInteger)len;
@end
@interface NSString : NSObject
+ (instancetype)stringWithUTF8String:(const char*)string;
@property(readonly) const char* UTF8String;
@end
@interface NSArray<ObjectType> : NSObject <NSFastEnumeration>
@end
@interface NSDictionary<KeyType, ObjectType> : NSObject
@end
@interface NSError : NSObject
@property(readonly, copy) NSString* localizedDescription;
@end
@interface NSURL : NSObject
+ (NSURL*)fileURLWithPath:(NSString*)path;
@end
""",
    "Metal/Metal.h": """
#pragma once
#include <Foundation/Foundation.h>
typedef struct { NSUInteger width, height, depth; } MTLSize;
MTLSize MTLSizeMake(NSUInteger width, NSUInteger height, NSUInteger depth);
@protocol MTLDevice;
@protocol MTLFunction <NSObject>
@end
@protocol MTLLibrary <NSObject>
- (id<MTLFunction>)newFunctionWithName:(NSString*)functionName;
@property(readonly) NSArray<NSString*>* functionNames;
@end
@protocol MTLComputePipelineState <NSObject>
@property(readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@property(readonly) NSUInteger staticThreadgroupMemoryLength;
@end
@protocol MTLBuffer <NSObject>
@property(readonly) NSUInteger length;
@end
@protocol MTLComputeCommandEncoder <NSObject>
@property(readonly) id<MTLDevice> device;
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state;
- (void)setBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setBytes:(const void*)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)setThreadgroupMemoryLength:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
@end
@protocol MTLCommandBuffer <NSObject>
@end
@protocol MTLCommandQueue <NSObject>
@end
@protocol MTLSharedEvent <NSObject>
@end
typedef void (^MTLCommandBufferHandler)(id<MTLCommandBuffer>);
@protocol MTLDevice <NSObject>
- (id<MTLLibrary>)newLibraryWithURL:(NSURL*)url error:(NSError**)error;
- (id<MTLComputePipelineState>)newComputePipelineStateWithFunction:(id<MTLFunction>)function error:(NSError**)error;
@property(readonly) NSUInteger maxThreadgroupMemoryLength;
@end
extern "C" id<MTLDevice> MTLCreateSystemDefaultDevice(void);
""",
    "MetalPerformanceShaders/MetalPerformanceShaders.h": """
#pragma once
#include <Metal/Metal.h>
@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end
""",
    "MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h": """
#pragma once
#include <MetalPerformanceShaders/MetalPerformanceShaders.h>
@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end
""",
}
CLANG = shutil.which("clang++-19") or shutil.which("clang++")
TORCH_INCLUDE = Path(torch.__file__).parent / "include"


def parse(arguments: list[str]) -> None:
    result = subprocess.run([CLANG, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "csrc"),
                             *arguments], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_objcxx_dispatch_parses_against_torch(tmp_path):
    for name, text in APPLE_DECLARATIONS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    parse(["-x", "objective-c++", "-std=c++20", "-fblocks", "-fobjc-runtime=macosx-13.0", "-fobjc-exceptions",
           "-isystem", str(tmp_path), "-isystem", str(TORCH_INCLUDE),
           "-isystem", str(TORCH_INCLUDE / "torch" / "csrc" / "api" / "include"),
           str(ROOT / "csrc" / "metal" / "metal_runtime.mm")])


@pytest.mark.parametrize("source", ["csrc/metal/metal_bindings.cpp", "csrc/bindings.cpp"])
def test_the_metal_bindings_parse(source):
    """The nanobind side of a macOS build (bindings.cpp with METAL_MARLIN_METAL defined)."""
    parse(["-x", "c++", "-std=c++17", "-Wno-unused-parameter", "-DMETAL_MARLIN_METAL=1",
           "-isystem", nanobind.include_dir(), "-isystem", sysconfig.get_paths()["include"], str(ROOT / source)])
