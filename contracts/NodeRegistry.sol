// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ModelRegistry} from "./ModelRegistry.sol";
import {StakeManager} from "./StakeManager.sol";

/// @title NodeRegistry
/// @notice A node (its operator account) announces where it listens, its X25519 encryption key, the model
/// and layer range [start, end) it serves and its price per token. It is listed only while it is not
/// paused and its bonded stake is at least `minStake`. Nodes are enumerable per model (for clients). Each slice
/// (model, start, end) keeps an append-only list of every node that ever served it (for the DisputeManager's
/// verifier draw): an index names the same node for good, so nobody can reorder a slice to steer a draw whose
/// randomness is already known.
contract NodeRegistry {
    struct Node {
        bool registered;
        bool paused;
        uint16 layerStart;
        uint16 layerEnd;
        uint128 pricePerToken;
        uint64 activeSince; // block since which the node has served its slice without a pause
        bytes32 modelId;
        bytes32 encryptionKey;
        string[] endpoints;
    }

    /// @notice One registered node as `nodesOf` returns it: its operator, whether it is listed now, and its record.
    struct Listing {
        address operator;
        bool listed;
        Node node;
    }

    uint256 public constant MAX_ENDPOINTS = 4;
    uint256 public constant MAX_ENDPOINT_LENGTH = 256;
    uint256 public constant MAX_PAGE = 100;

    /// @notice Where stakes are read.
    StakeManager public immutable stakeManager;
    /// @notice Where models and their layer counts are read.
    ModelRegistry public immutable modelRegistry;
    /// @notice Bonded stake a node needs to register and to stay listed.
    uint256 public immutable minStake;

    mapping(address operator => Node) private _nodes;
    mapping(bytes32 modelId => address[]) private _modelNodes;
    mapping(address operator => uint256) private _modelIndex; // index + 1 in _modelNodes
    mapping(bytes32 sliceKey => address[]) private _sliceMembers; // append-only: a node is added on its first join
    mapping(bytes32 sliceKey => mapping(address operator => bool)) private _inSliceList;

    event NodeRegistered(
        address indexed operator,
        bytes32 indexed modelId,
        uint16 layerStart,
        uint16 layerEnd,
        uint128 pricePerToken,
        bytes32 encryptionKey,
        string[] endpoints
    );
    event NodeUpdated(
        address indexed operator,
        bytes32 indexed modelId,
        uint16 layerStart,
        uint16 layerEnd,
        uint128 pricePerToken,
        bytes32 encryptionKey,
        string[] endpoints
    );
    event NodePaused(address indexed operator);
    event NodeUnpaused(address indexed operator);
    event NodeDeregistered(address indexed operator);

    error AlreadyRegistered(address operator);
    error NotRegistered(address operator);
    error UnknownModel(bytes32 modelId);
    error InvalidLayerRange(uint16 start, uint16 end, uint16 layerCount);
    error InsufficientStake(uint256 bonded, uint256 required);
    error InvalidEndpoints();
    error ZeroEncryptionKey();
    error AlreadyPaused(address operator);
    error NotPaused(address operator);
    error PageTooLarge(uint256 limit);

    /// @param stakeManager_ Stake contract whose bonded stake gates listing.
    /// @param modelRegistry_ Model registry that validates model ids and layer ranges.
    /// @param minStake_ Minimum bonded stake of a listed node.
    constructor(StakeManager stakeManager_, ModelRegistry modelRegistry_, uint256 minStake_) {
        stakeManager = stakeManager_;
        modelRegistry = modelRegistry_;
        minStake = minStake_;
    }

    /// @notice Register the caller as a node serving layers [layerStart, layerEnd) of `modelId`.
    /// @param modelId Model id from the ModelRegistry.
    /// @param layerStart First served layer.
    /// @param layerEnd One past the last served layer (at most the model's layer count).
    /// @param pricePerToken Price per processed token, in the escrow token's smallest unit.
    /// @param encryptionKey X25519 public key clients encrypt frames to.
    /// @param endpoints 1-4 URLs (each at most 256 bytes) where the node listens.
    function register(
        bytes32 modelId,
        uint16 layerStart,
        uint16 layerEnd,
        uint128 pricePerToken,
        bytes32 encryptionKey,
        string[] calldata endpoints
    ) external {
        Node storage node = _nodes[msg.sender];
        if (node.registered) revert AlreadyRegistered(msg.sender);
        uint256 bonded = stakeManager.bondedOf(msg.sender);
        if (bonded < minStake) revert InsufficientStake(bonded, minStake);
        _write(node, modelId, layerStart, layerEnd, pricePerToken, encryptionKey, endpoints);
        node.registered = true;
        node.activeSince = uint64(block.number);
        _addToModel(msg.sender, modelId);
        _joinSlice(msg.sender, sliceKey(modelId, layerStart, layerEnd));
        emit NodeRegistered(msg.sender, modelId, layerStart, layerEnd, pricePerToken, encryptionKey, endpoints);
    }

    /// @notice Change everything the caller announced; same rules as `register`. Moving to another slice restarts
    /// the node's active time there (see `verifierAt`).
    /// @param modelId Model id from the ModelRegistry.
    /// @param layerStart First served layer.
    /// @param layerEnd One past the last served layer.
    /// @param pricePerToken Price per processed token.
    /// @param encryptionKey X25519 public key.
    /// @param endpoints 1-4 URLs.
    function update(
        bytes32 modelId,
        uint16 layerStart,
        uint16 layerEnd,
        uint128 pricePerToken,
        bytes32 encryptionKey,
        string[] calldata endpoints
    ) external {
        Node storage node = _requireRegistered(msg.sender);
        bytes32 oldModel = node.modelId;
        bytes32 oldSlice = sliceKey(oldModel, node.layerStart, node.layerEnd);
        _write(node, modelId, layerStart, layerEnd, pricePerToken, encryptionKey, endpoints);
        if (modelId != oldModel) {
            _swapAndPop(_modelNodes[oldModel], _modelIndex, msg.sender);
            _addToModel(msg.sender, modelId);
        }
        bytes32 newSlice = sliceKey(modelId, layerStart, layerEnd);
        if (newSlice != oldSlice) {
            node.activeSince = uint64(block.number);
            _joinSlice(msg.sender, newSlice);
        }
        emit NodeUpdated(msg.sender, modelId, layerStart, layerEnd, pricePerToken, encryptionKey, endpoints);
    }

    /// @notice Stop being listed (e.g. for maintenance) without losing the registration.
    function pause() external {
        Node storage node = _requireRegistered(msg.sender);
        if (node.paused) revert AlreadyPaused(msg.sender);
        node.paused = true;
        emit NodePaused(msg.sender);
    }

    /// @notice Be listed again after `pause`; the node's active time in its slice starts again.
    function unpause() external {
        Node storage node = _requireRegistered(msg.sender);
        if (!node.paused) revert NotPaused(msg.sender);
        node.paused = false;
        node.activeSince = uint64(block.number);
        emit NodeUnpaused(msg.sender);
    }

    /// @notice Remove the caller's registration (its stake stays in the StakeManager, slashable as before).
    function deregister() external {
        Node storage node = _requireRegistered(msg.sender);
        _swapAndPop(_modelNodes[node.modelId], _modelIndex, msg.sender);
        delete _nodes[msg.sender];
        emit NodeDeregistered(msg.sender);
    }

    /// @notice The registration of `operator`; reverts with NotRegistered if none.
    function getNode(address operator) external view returns (Node memory) {
        Node memory node = _nodes[operator];
        if (!node.registered) revert NotRegistered(operator);
        return node;
    }

    /// @notice Whether `operator` is registered, not paused and holds at least `minStake` bonded.
    function isListed(address operator) public view returns (bool) {
        Node storage node = _nodes[operator];
        return node.registered && !node.paused && stakeManager.bondedOf(operator) >= minStake;
    }

    /// @notice Number of registered nodes (listed or not) serving some layers of `modelId`.
    function modelNodeCount(bytes32 modelId) external view returns (uint256) {
        return _modelNodes[modelId].length;
    }

    /// @notice Up to `limit` (at most 100) registered nodes of `modelId` from position `offset`; check `isListed`.
    function modelNodes(bytes32 modelId, uint256 offset, uint256 limit) external view returns (address[] memory page) {
        return _page(_modelNodes[modelId], offset, limit);
    }

    /// @notice Up to `limit` (at most 100) registered nodes of `modelId` from position `offset`, each with its whole
    /// record and whether it is listed: a client reads a model's market in `modelNodeCount / 100` calls, not two per node.
    /// @dev Read every page at one block number: a deregistration between pages moves the last node into the freed slot.
    /// @param modelId Model id from the ModelRegistry.
    /// @param offset Position of the first node in the model's list.
    /// @param limit Most nodes returned (at most MAX_PAGE).
    function nodesOf(bytes32 modelId, uint256 offset, uint256 limit) external view returns (Listing[] memory page) {
        address[] memory operators = _page(_modelNodes[modelId], offset, limit);
        page = new Listing[](operators.length);
        for (uint256 i = 0; i < operators.length; ++i) {
            page[i] = Listing(operators[i], isListed(operators[i]), _nodes[operators[i]]);
        }
    }

    /// @notice Key of the slice (model, layers [start, end)) used by `sliceLength`, `sliceMemberAt` and `verifierAt`.
    function sliceKey(bytes32 modelId, uint16 layerStart, uint16 layerEnd) public pure returns (bytes32) {
        return keccak256(abi.encode(modelId, layerStart, layerEnd));
    }

    /// @notice Number of nodes that ever served exactly the slice `key` (some may have left it since).
    function sliceLength(bytes32 key) external view returns (uint256) {
        return _sliceMembers[key].length;
    }

    /// @notice The node at `index` of slice `key`'s append-only list; check `isSliceMember` for whether it still serves it.
    function sliceMemberAt(bytes32 key, uint256 index) external view returns (address) {
        return _sliceMembers[key][index];
    }

    /// @notice Whether `operator` is registered for exactly the slice `key` (listed or not).
    function isSliceMember(address operator, bytes32 key) public view returns (bool) {
        Node storage node = _nodes[operator];
        return node.registered && sliceKey(node.modelId, node.layerStart, node.layerEnd) == key;
    }

    /// @notice The node at `index` of slice `key`, and whether it may sit on a panel drawn from randomness that did
    /// not exist before block `before`: it serves the slice, is listed, and neither joined the slice, unpaused nor
    /// added stake at `before` or later. So a node cannot become a verifier after seeing the randomness; it can only
    /// drop out, which never changes who else is drawn.
    /// @param key The slice.
    /// @param index Position in the slice's append-only list (below `sliceLength`).
    /// @param before First block whose state may already depend on the randomness.
    function verifierAt(bytes32 key, uint256 index, uint256 before) external view returns (address operator, bool eligible) {
        operator = _sliceMembers[key][index];
        Node storage node = _nodes[operator];
        if (!node.registered || node.paused || node.activeSince >= before) return (operator, false);
        if (sliceKey(node.modelId, node.layerStart, node.layerEnd) != key) return (operator, false);
        StakeManager.StakeInfo memory info = stakeManager.stakeOf(operator);
        eligible = info.bonded >= minStake && info.stakedAt < before;
    }

    function _write(
        Node storage node,
        bytes32 modelId,
        uint16 layerStart,
        uint16 layerEnd,
        uint128 pricePerToken,
        bytes32 encryptionKey,
        string[] calldata endpoints
    ) private {
        uint16 layerCount = modelRegistry.layerCountOf(modelId);
        if (layerCount == 0) revert UnknownModel(modelId);
        if (layerStart >= layerEnd || layerEnd > layerCount) revert InvalidLayerRange(layerStart, layerEnd, layerCount);
        if (encryptionKey == bytes32(0)) revert ZeroEncryptionKey();
        if (endpoints.length == 0 || endpoints.length > MAX_ENDPOINTS) revert InvalidEndpoints();
        node.modelId = modelId;
        node.layerStart = layerStart;
        node.layerEnd = layerEnd;
        node.pricePerToken = pricePerToken;
        node.encryptionKey = encryptionKey;
        delete node.endpoints;
        for (uint256 i = 0; i < endpoints.length; ++i) {
            uint256 length = bytes(endpoints[i]).length;
            if (length == 0 || length > MAX_ENDPOINT_LENGTH) revert InvalidEndpoints();
            node.endpoints.push(endpoints[i]);
        }
    }

    function _requireRegistered(address operator) private view returns (Node storage node) {
        node = _nodes[operator];
        if (!node.registered) revert NotRegistered(operator);
    }

    function _addToModel(address operator, bytes32 modelId) private {
        address[] storage models = _modelNodes[modelId];
        models.push(operator);
        _modelIndex[operator] = models.length;
    }

    /// @dev A node coming back to a slice keeps its old place in the list: the list grows only with new nodes.
    function _joinSlice(address operator, bytes32 key) private {
        if (_inSliceList[key][operator]) return;
        _inSliceList[key][operator] = true;
        _sliceMembers[key].push(operator);
    }

    function _swapAndPop(address[] storage list, mapping(address => uint256) storage indexOf, address operator)
        private
    {
        uint256 index = indexOf[operator] - 1;
        address last = list[list.length - 1];
        list[index] = last;
        indexOf[last] = index + 1;
        list.pop();
        delete indexOf[operator];
    }

    function _page(address[] storage list, uint256 offset, uint256 limit) private view returns (address[] memory page) {
        if (limit > MAX_PAGE) revert PageTooLarge(limit);
        uint256 end = offset + limit < list.length ? offset + limit : list.length;
        page = new address[](end > offset ? end - offset : 0);
        for (uint256 i = 0; i < page.length; ++i) {
            page[i] = list[offset + i];
        }
    }
}
